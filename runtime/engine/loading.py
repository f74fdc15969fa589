"""How the weights reach memory: llama.cpp's load modes, and dropping the mapped pages it has copied."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

from huatuo_local.runtime.llama import constants as C
from huatuo_local.runtime.system import rss, rss_anon

# llama.cpp's load modes (llama.h `enum llama_load_mode`), by the name `--load` takes.
LOAD_MODES = {"read": C.LLAMA_LOAD_MODE_NONE, "mmap": C.LLAMA_LOAD_MODE_MMAP, "mmap-release": C.LLAMA_LOAD_MODE_MMAP}

_MADV_DONTNEED = 4


def _madvise():
    """libc's madvise, or None where there is none (then dropping and faulting ahead are no-ops)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def _mappings() -> list[tuple[int, int, str, int, str]]:
    """(start, end, permissions, file offset, path; '' for anonymous memory) of this process's mappings."""
    out = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) >= 5:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    path = parts[5].rstrip("\n") if len(parts) == 6 else ""
                    out.append((start, end, parts[1], int(parts[2], 16), path))
    except OSError:
        pass
    return out


class MappedPages:
    """Drops the resident pages of llama.cpp's read-only mapping of a GGUF while and after it loads.

    Why: on CPU llama.cpp repacks most quantized weights (Q4_K, Q4_0 ...) into its own buffers, copying
    them out of the mapped file, yet the mapped pages it read stay resident: the weights in memory
    twice. Reading the file instead ("read") avoids that but costs the kernel time of faulting every
    page of an anonymous buffer. Mapping and dropping the pages already read keeps the mapping's speed
    and the read path's footprint. Dropping pages of a shared read-only file mapping is always safe:
    a tensor still used from the mapping (the token embeddings, norms) is faulted back in from the page
    cache the next time it is read. Pages are dropped only while loading copies most of what it reads
    (anonymous memory grows with the data loaded): a model whose weights are used in place (F16 on
    most CPUs) keeps its mapping as it is. Linux only; elsewhere a no-op.
    """

    STEP = 64 << 20  # drop in steps of this many bytes of loaded data (each step reads /proc/self/status)

    def __init__(self, path: Path):
        self.path = os.path.realpath(path)
        self.size = os.path.getsize(path)
        self.dropped = 0  # file offset below which pages were dropped once
        self.anon0 = rss_anon()
        self._maps: list[tuple[int, int, int]] | None = None
        self._madvise = _madvise()

    def _ranges(self) -> list[tuple[int, int, int]]:
        """(start, end, file offset) of this file's mappings in this process."""
        return [(start, end, offset) for start, end, _, offset, path in _mappings() if path == self.path]

    def _drop(self, first: int, last: int, maps: list[tuple[int, int, int]]) -> None:
        """Drop the pages of file bytes [first, last) wherever they are mapped."""
        if self._madvise is None:
            return
        page = mmap.PAGESIZE
        for start, end, offset in maps:
            lo = max(start, start + first - offset)
            hi = min(end, start + last - offset)
            lo += -(lo - start) % page
            hi -= (hi - start) % page
            if hi > lo:
                self._madvise(lo, hi - lo, _MADV_DONTNEED)

    def progress(self, fraction: float, _user: object) -> bool:
        # Called by llama.cpp between tensors. They load roughly in file order (per buffer type):
        # a tenth of the file is kept as a margin behind the loader, and everything behind it is
        # dropped again at each step (pages read twice come back). Only once the load is seen
        # copying (anonymous memory growing past what loading allocates for itself).
        upto = int((fraction - 0.1) * self.size)
        if upto - self.dropped >= self.STEP and rss_anon() - self.anon0 > max(256 << 20, self.size // 20):
            if self._maps is None:
                self._maps = self._ranges()
            self._drop(0, upto, self._maps)
            self.dropped = upto
        return True

    def release_all(self) -> None:
        """After loading: drop every mapped page if the load copied the weights out of the mapping."""
        if self.dropped or rss_anon() - self.anon0 > self.size // 2:
            self._drop(0, self.size, self._ranges())  # llama.cpp unmapped parts at the end: read the maps again


_MADV_POPULATE_WRITE = 23  # Linux 5.14


def _anonymous_regions() -> list[tuple[int, int]]:
    """(start, end) of this process's private read-write anonymous mappings."""
    return [(start, end) for start, end, perms, _, path in _mappings() if not path and perms == "rw-p"]


class FaultAhead:
    """Prepares, on another core, the fresh memory llama.cpp is about to copy the weights into.

    Why: on the CPU llama.cpp repacks most quantized weights into a buffer it allocates just before it
    loads them, and the kernel zeroes each page of it the first time the loader writes there. Measured
    with perf (7B shapes, Q4_K_M, a 2-core VM): that zeroing was 40% of the load's time, all of it on the
    one thread that loads. Here the buffer is found (the large anonymous mappings that appeared since
    loading began, seen at llama.cpp's first progress call, which comes after it has allocated its
    buffers) and faulted in from its start by a thread of ours, ahead of the loader, which then finds its
    pages ready. (Transparent huge pages for it were tried and left out: on that VM zeroing 2 MiB pages
    took twice the time of zeroing 4 KiB ones, and the prompt's matrix products were no faster.)

    Memory stays where the load alone would have it: llama.cpp maps the whole file in at first (its
    prefetch), and `MappedPages` drops the pages behind the loader; this thread only fills the room that
    dropping makes, never letting the process's resident memory pass what it was at the first progress
    call. Only mappings of at least `share` of the file's size are touched (the projector's
    buffers, loading beside, are far smaller than the LLM's), and only memory the load writes anyway;
    faulting in changes no byte. Linux only; elsewhere a no-op.
    """

    CHUNK = 32 << 20
    MIN_BYTES = 64 << 20  # smaller models load in moments
    HEADROOM = 0  # bytes the thread may add above the first call's resident memory (tests raise it)

    def __init__(self, file_size: int, share: float = 0.25):
        self.min_size = max(self.MIN_BYTES, int(file_size * share))
        self.before = set(_anonymous_regions())
        self.started = False
        self.faulted = 0  # bytes this thread faulted in (some may have been the loader's already)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self._madvise = _madvise()

    def progress(self, _fraction: float) -> None:
        """llama.cpp's progress call (the first one starts the work)."""
        if self.started or self._madvise is None:
            return
        self.started = True
        fresh = [(a, b) for a, b in _anonymous_regions() if (a, b) not in self.before and b - a >= self.min_size]
        if not fresh:
            return
        budget = rss() + self.HEADROOM
        self.thread = threading.Thread(target=self._fault, args=(fresh, budget), name="huatuo-fault-ahead",
                                       daemon=True)
        self.thread.start()

    def _fault(self, regions: list[tuple[int, int]], budget: int) -> None:
        assert self._madvise is not None
        for a, b in regions:
            for lo in range(a, b, self.CHUNK):
                while rss() + self.CHUNK > budget:  # no room yet: the loader must read on first
                    if self.stop.wait(0.005):
                        return
                if self.stop.is_set():
                    return
                n = min(self.CHUNK, b - lo)
                if self._madvise(lo, n, _MADV_POPULATE_WRITE) != 0:
                    return  # an older kernel (EINVAL), or the memory is gone: the loader faults on its own
                self.faulted += n

    def finish(self) -> None:
        """The load has returned: stop (before llama.cpp could reuse the addresses) and wait."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
