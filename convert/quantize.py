"""k-quants and llama.cpp's other types, through llama.cpp's own quantizer.

F32/F16/BF16/Q8_0 are written directly by `write.py`; everything else starts from a
lossless intermediate GGUF and goes through `llama_model_quantize`, exactly what
llama.cpp's `llama-quantize` tool runs.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable
from pathlib import Path

from huatuo_local.models.errors import HuatuoError

# llama.cpp's llama_ftype values (include/llama.h).
QUANT_FTYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "Q2_K_S": 21,
    "TQ1_0": 36, "TQ2_0": 37,
}
GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_PROGRESS = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")


def quantize_gguf(
    src: Path, dst: Path, quant: str, threads: int = 0, on_progress: Callable[[int, int], None] | None = None
) -> None:
    """Quantize `src` into `dst` (which should be a temporary name; the caller renames)."""
    import llama_cpp

    ftype = QUANT_FTYPES[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or (os.cpu_count() or 1)
    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        m = _PROGRESS.search(text or b"")
        if m and on_progress:
            on_progress(int(m.group(1)), int(m.group(2)))
        if level == GGML_LOG_LEVEL_ERROR and text:
            errors.append(text.decode("utf-8", "replace").strip())

    # Put back whatever callback was installed before (the runtime's error collector, or
    # llama-cpp-python's own): restoring a fixed one would silence the runtime's error messages.
    previous, previous_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(previous, previous_data)
    if rc != 0:
        detail = errors[-1] if errors else f"code {rc}"
        raise HuatuoError(f"{dst}: llama.cpp could not quantize to {quant} ({detail})")
