"""Start-up phases, timed: with HUATUO_LOCAL_TRACE=1 each phase's end is written to standard error as
`trace PHASE SECONDS` (seconds since the process started), for `bench/settings.py --load`'s table of where a
one-shot `chat` spends its time. Off, a mark costs one dictionary lookup; nothing is ever written to disk.

The lowest layer of the runtime beside system.py: it imports nothing of huatuo-local.
"""

from __future__ import annotations

import os
import sys
import time

ENABLED = os.environ.get("HUATUO_LOCAL_TRACE") == "1"


def _process_start() -> float:
    """This process's start on the perf_counter clock (from /proc: the interpreter's own start-up counts)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


_START = _process_start() if ENABLED else 0.0


def mark(phase: str) -> None:
    """Say that `phase` has ended (when tracing is on)."""
    if ENABLED:
        print(f"trace {phase} {time.perf_counter() - _START:.3f}", file=sys.stderr, flush=True)
