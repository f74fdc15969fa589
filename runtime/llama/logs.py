"""llama.cpp's and libmtmd's log lines: away from the terminal, errors kept for one-line messages."""

from __future__ import annotations

import ctypes
import os

from huatuo_local.runtime.llama import constants as C
from huatuo_local.runtime.llama.bindings import llama, mtmd

_LOG_CALLBACK = None
LAST_ERRORS: list[str] = []  # llama.cpp's last error lines, for the one-line message of a failure


def quiet_logs() -> None:
    """Route llama.cpp's and libmtmd's logs away from the terminal; keep errors for messages.

    HUATUO_LOCAL_VERBOSE=1 shows everything, as llama.cpp's own tools would.
    """
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    llama_cpp = llama()
    verbose = os.environ.get("HUATUO_LOCAL_VERBOSE") == "1"

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if verbose:
            os.write(2, text or b"")
        elif level == C.GGML_LOG_LEVEL_ERROR and text:
            LAST_ERRORS.append(text.decode("utf-8", "replace").strip())
            del LAST_ERRORS[:-20]

    _LOG_CALLBACK = log
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    mtmd().mtmd_helper_log_set(log, ctypes.c_void_p(0))
