"""Ctrl-C and SIGTERM stop long native work within seconds, and what it staged is removed.

Two things stood in the way (issue 36). Python runs signal handlers only in the main thread, between
bytecodes: while the main thread is inside a long C call (llama.cpp's quantizer, a decode feeding the
importance matrix), the handler's KeyboardInterrupt is raised inside whatever ctypes callback runs
next, where ctypes prints "Exception ignored" and drops it, and the work goes on to the end. And
SIGTERM's default action ends the process at once, so no `finally` removes staged files.

`run_interruptibly` runs the native call in a worker thread while the main thread waits in Python, so
the interrupt is raised in the main thread and unwinds through every `finally` (staged files are
deleted even while the worker still writes them: it writes to an unlinked file). The worker cannot be
stopped inside C; callbacks it calls should check `cancelled()` and cut their work short, and the
command line ends the process with `os._exit` once everything is cleaned up (runtime/cli/app.py).
`terminate_as_interrupt` makes SIGTERM take the same path as Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
_CANCELLED = threading.Event()


def cancelled() -> bool:
    """True once the process was interrupted: native work's callbacks stop as soon as they can."""
    return _CANCELLED.is_set()


def run_interruptibly(work: Callable[..., T], *args: object) -> T:
    """`work(*args)` in a worker thread; Ctrl-C (or SIGTERM, see terminate_as_interrupt) in the main thread
    raises KeyboardInterrupt here at once and sets `cancelled()`. Anything `work` raises is raised here."""
    if threading.current_thread() is not threading.main_thread():
        return work(*args)  # signals reach only the main thread: nothing to gain from another thread
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work(*args))
        except BaseException as exc:  # handed to the waiting thread
            error.append(exc)

    worker = threading.Thread(target=run, name="huatuo-native", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)  # returns to Python often, so a signal's handler runs here
    except BaseException:
        _CANCELLED.set()
        raise
    if error:
        raise error[0]
    return result[0]


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread while the block runs (a stopped convert cleans up
    as after Ctrl-C instead of leaving its staged files). Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
