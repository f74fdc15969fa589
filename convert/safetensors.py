"""Torch-free, memory-mapped safetensors reading: one tensor at a time.

Only the header is parsed up front; each tensor is a read-only numpy view into the
mapped file, so converting a 15 GB checkpoint never holds more than one tensor's
converted copy in memory.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huatuo_local.models.errors import CheckpointError

# bf16 has no numpy dtype: it is read as uint16 and widened on demand.
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives; `load()` maps it, `load_f32()` widens it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: SafetensorsFile
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def load(self) -> np.ndarray:
        """The raw values, as stored (bf16 comes back as uint16 bit patterns)."""
        return self.file.view(self)

    def release(self, lo: int = 0, hi: int | None = None) -> None:
        """Drop bytes [lo, hi) of this tensor from the process (they stay in the page cache)."""
        self.file.release(self.start + lo, self.start + (self.nbytes if hi is None else hi))

    def load_f32(self) -> np.ndarray:
        raw = self.load()
        if self.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)


class SafetensorsFile:
    """One .safetensors file, header parsed, data memory-mapped lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header); download it again")
                (n,) = struct.unpack("<Q", head)
                if n < 2 or n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: truncated or corrupt safetensors header; download the file again"
                    )
                header = json.loads(f.read(n))
        except RecursionError as exc:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (nested too deep)") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                raise CheckpointError(f"{self.path}: cannot read ({exc.strerror}); check the file") from exc
            if isinstance(exc, FileNotFoundError):
                raise CheckpointError(f"{self.path}: missing; download the checkpoint again") from exc
            raise CheckpointError(f"{self.path}: corrupt safetensors header; download the file again") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object); download it again")
        metadata = header.pop("__metadata__", {}) or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise CheckpointError(f"{self.path}: corrupt safetensors metadata (must map text to text)")
        self.metadata = metadata
        data_start = 8 + n
        self.tensors: dict[str, TensorRef] = {}
        spans: list[tuple[int, int, str]] = []
        for name, info in header.items():
            start, end, dtype, shape = self._entry(name, info, data_start, size)
            self.tensors[name] = TensorRef(name, dtype, shape, self, start, end)
            if end > start:
                spans.append((start, end, name))
        # Tensors may not share bytes: an overlap means the header lies about the layout.
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise CheckpointError(f"{self.path}: tensors {a} and {b} overlap; the file is corrupt")

    def _entry(self, name: str, info: object, data_start: int, size: int) -> tuple[int, int, str, tuple[int, ...]]:
        """One header entry, checked: dtype known, shape and offsets integers, size consistent, in the file."""
        if not isinstance(info, dict):
            raise CheckpointError(f"{self.path}: tensor {name} has a malformed header entry; the file is corrupt")
        dtype, offsets, shape = info.get("dtype"), info.get("data_offsets"), info.get("shape")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {dtype}")

        def ints(v: object, n: int | None) -> bool:
            return (isinstance(v, list) and (n is None or len(v) == n) and len(v) <= 8
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))

        if not ints(offsets, 2) or not ints(shape, None):
            raise CheckpointError(f"{self.path}: tensor {name} has invalid shape or offsets; the file is corrupt")
        lo, hi = offsets  # type: ignore[misc]
        if hi < lo:
            raise CheckpointError(f"{self.path}: tensor {name} ends before it starts; the file is corrupt")
        start, end = data_start + lo, data_start + hi
        expected = int(np.prod(shape, dtype=object)) * _DTYPES[dtype].itemsize
        if end - start != expected:
            raise CheckpointError(f"{self.path}: tensor {name} has inconsistent size; the file is corrupt")
        if end > size:
            raise CheckpointError(
                f"{self.path}: truncated (tensor {name} ends past the end of the file); download it again"
            )
        return start, end, dtype, tuple(shape)  # type: ignore[arg-type]

    def view(self, ref: TensorRef) -> np.ndarray:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        arr = np.frombuffer(self._mmap, dtype=_DTYPES[ref.dtype], count=ref.nbytes // _DTYPES[ref.dtype].itemsize,
                            offset=ref.start)
        return arr.reshape(ref.shape)

    def release(self, start: int, end: int) -> None:
        # Mapped pages count as the process's memory once touched; without this the peak
        # would grow with the largest tensor (or the whole file) instead of one chunk.
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start -= start % page
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        # Views into the map may still be alive; let the GC unmap once they are gone.
        self._mmap = None
