"""Facts about this machine that several layers need: physical cores, memory, this process's memory.

The lowest layer of the runtime (it imports nothing of huatuo-local): the image loader checks a
DICOM's size against available memory, the engine picks its threads and splits layers by free
memory, and the doctor reports all of it.
"""

from __future__ import annotations

import os
from pathlib import Path

GIB = 1024**3


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores, the thread count llama.cpp's own tools default to: with SMT, a second thread on a
    core competes for the same vector units and these kernels slow down (bench/settings.py measures it)."""
    try:
        cores, block = set(), {}
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
        for line in text.splitlines() + [""]:
            if not line.strip():
                if "core id" in block:
                    cores.add((block.get("physical id", "0"), block["core id"]))
                block = {}
            elif ":" in line:
                key, _, value = line.partition(":")
                block[key.strip()] = value.strip()
        if cores:
            return len(cores)
    except OSError:
        pass
    return max(1, os.cpu_count() or 1)


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_anon() -> int:
    """This process's resident anonymous memory in bytes (0 where /proc is not there)."""
    return _status_bytes("RssAnon:")


def rss() -> int:
    """This process's resident memory in bytes, anonymous and file-backed (0 where /proc is not there)."""
    return _status_bytes("VmRSS:")


def memory_gib() -> tuple[float, float]:
    """(total, available) memory in GiB."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / GIB, available_memory() / GIB


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or physical memory where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def descendants(pid: int | None = None) -> list[int]:
    """The processes `pid` (default: this one) started, and theirs, from /proc (Linux; elsewhere none)."""
    parent_of: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
            parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # after the (name): state, ppid
        except (OSError, ValueError, IndexError):
            continue
    root = os.getpid() if pid is None else pid
    found, frontier = [], [root]
    while frontier:
        children = [p for p, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found
