"""k-quants and llama.cpp's other types, through llama.cpp's own quantizer.

F32/F16/BF16/Q8_0 are written directly by `write.py`; everything else starts from a
lossless intermediate GGUF and goes through `llama_model_quantize`, exactly what
llama.cpp's `llama-quantize` tool runs.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.interrupt import run_interruptibly

# llama.cpp's llama_ftype values (include/llama.h).
QUANT_FTYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "Q2_K_S": 21,
    "TQ1_0": 36, "TQ2_0": 37,
    "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ1_M": 31,
}
# With the types write.py writes directly: what llama.cpp's quantizer makes from a lossless GGUF (a quant
# made from a kept lossless conversion, without the checkpoint).
ALL_FTYPES = {**QUANT_FTYPES, "F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}
# Quants whose tensor types llama.cpp refuses to make without an importance matrix (llama-quant.cpp,
# tensor_requires_imatrix: IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M, and Q2_K inside Q2_K_S).
NEEDS_IMATRIX = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ1_S", "IQ1_M", "Q2_K_S"})
# Quants whose quality depends on a matrix even where llama.cpp does not insist: `pull` computes one
# for them (llama.cpp's own guidance: below 4 bits, and the non-linear IQ4 types).
WANTS_IMATRIX = NEEDS_IMATRIX | {"IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_XS", "IQ4_NL", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L"}
GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_PROGRESS = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")


def require_imatrix(quant: str, have_one: bool) -> None:
    """Refuse, in one line, a quant llama.cpp cannot make without an importance matrix."""
    if quant in NEEDS_IMATRIX and not have_one:
        raise HuatuoError(f"--quant {quant} needs an importance matrix: add --imatrix auto (computed from image and "
                          "text prompts) or --imatrix FILE")


@contextmanager
def llama_logs_to(on_line: Callable[[int, bytes], None]) -> Iterator[None]:
    """Send llama.cpp's log lines to `on_line(level, text)` while the block runs (what its quantizer and
    loader report is only in the log), then put back whatever callback was installed before: the
    runtime's error collector or llama-cpp-python's own (restoring a fixed one would silence the
    runtime's error messages)."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        on_line(level, text or b"")

    previous, previous_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(previous, previous_data)


def quantize_gguf(
    src: Path, dst: Path, quant: str, threads: int = 0, on_progress: Callable[[int, int], None] | None = None,
    imatrix: dict[str, np.ndarray] | None = None,
) -> None:
    """Quantize `src` into `dst` (which should be a temporary name; the caller renames).

    `imatrix`: per weight, the per-column mean squares of its inputs (models/imatrix.py), which
    llama.cpp uses to weigh each column's rounding error; required for the quants in NEEDS_IMATRIX."""
    import llama_cpp

    require_imatrix(quant, bool(imatrix))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ALL_FTYPES[quant]
    params.nthread = threads or (os.cpu_count() or 1)
    keep = _imatrix_param(params, imatrix) if imatrix else None  # noqa: F841  (alive through the call)
    errors: list[str] = []

    def on_line(level: int, text: bytes) -> None:
        m = _PROGRESS.search(text)
        if m and on_progress:
            on_progress(int(m.group(1)), int(m.group(2)))
        if level == GGML_LOG_LEVEL_ERROR and text:
            errors.append(text.decode("utf-8", "replace").strip())

    with llama_logs_to(on_line):
        # In a worker thread: Ctrl-C and SIGTERM reach the main thread at once and unwind the convert
        # (models/interrupt.py); llama.cpp's quantizer has no way to be stopped, and dies with the process.
        rc = run_interruptibly(llama_cpp.llama_model_quantize, str(src).encode(), str(dst).encode(),
                               ctypes.byref(params))
    if rc != 0:
        detail = errors[-1] if errors else f"code {rc}"
        raise HuatuoError(f"{dst}: llama.cpp could not quantize to {quant} ({detail})")


_QUANT_SIZE = re.compile(rb"quant size\s*=\s*([0-9.]+) MiB")


def quantized_size(src: Path, quant: str) -> int:
    """The bytes llama.cpp's quantizer would write for `src` as `quant`, without quantizing (its dry run:
    only the shapes are read, so a file whose data was never written answers too). To 10 KiB."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ALL_FTYPES[quant]
    params.dry_run = True
    found: list[float] = []

    def on_line(_level: int, text: bytes) -> None:
        m = _QUANT_SIZE.search(text)
        if m:
            found.append(float(m.group(1)))

    with llama_logs_to(on_line):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), os.devnull.encode(), ctypes.byref(params))
    if rc != 0 or not found:
        raise HuatuoError(f"{src}: llama.cpp could not size a {quant} quant (code {rc})")
    return int(found[-1] * 1024 * 1024)


def _imatrix_param(params, imatrix: dict[str, np.ndarray]):
    """llama.cpp's `llama_model_imatrix_data` array (NULL-terminated) in `params`; returns what must stay alive."""
    import llama_cpp

    arrays = {name.encode(): np.ascontiguousarray(v, dtype=np.float32) for name, v in sorted(imatrix.items())}
    table = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for i, (name, data) in enumerate(arrays.items()):
        table[i].name = name
        table[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        table[i].size = data.size
    table[len(arrays)].name = None
    params.imatrix = table
    return table, arrays
