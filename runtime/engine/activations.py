"""What each weight matrix multiplies: llama.cpp's eval callback, read from Python.

llama.cpp calls the callback for every node of the graph it computes, first asking whether we want
the node's data, then (for those we want) once it is computed. We want the matrix products whose
first operand is a layer's weight (`blk.N.*.weight`): their second operand, one row per position, is
what an importance matrix is made of (llama.cpp's imatrix tool does the same; the LM head is left
out, as that tool does by default). The rows are copied out through `ggml_backend_tensor_get`, so
this works wherever the graph runs.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np
from huatuo_local.models.interrupt import cancelled
from huatuo_local.runtime.llama import constants as C
from huatuo_local.runtime.llama.bindings import llama
from huatuo_local.runtime.llama.devices import loaded_library


class GgmlTensor(ctypes.Structure):
    """ggml.h's `struct ggml_tensor` of the pinned llama.cpp (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
    GGML_MAX_SRC 10, GGML_MAX_NAME 64; tests/test_imatrix.py reads a real graph through it)."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _weight_name(node: GgmlTensor) -> str | None:
    """The layer weight a matrix product multiplies by, or None for any other node."""
    if node.op != C.GGML_OP_MUL_MAT or not node.src[0] or not node.src[1]:
        return None
    name = GgmlTensor.from_address(node.src[0]).name.decode("utf-8", "replace")
    return name if name.startswith("blk.") and name.endswith(".weight") else None


def matmul_observer(on_rows: Callable[[str, np.ndarray], None]):
    """llama.cpp's eval callback that hands each layer weight's input rows (n_rows, n_cols) to `on_rows`."""
    base = loaded_library("libggml-base")
    base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    base.ggml_nbytes.argtypes = [ctypes.c_void_p]
    base.ggml_nbytes.restype = ctypes.c_size_t

    def callback(node_ptr: int, ask: bool, _user: int) -> bool:
        if cancelled():  # Ctrl-C or SIGTERM: stop this graph now (the caller then stops computing)
            return False
        node = GgmlTensor.from_address(node_ptr)
        name = _weight_name(node)
        if ask:
            return name is not None
        if name is None:
            return True  # (data wanted by nobody: go on computing)
        src = GgmlTensor.from_address(node.src[1])
        if src.type != C.GGML_TYPE_F32:
            return True
        size = base.ggml_nbytes(node.src[1])
        buf = np.empty(size, dtype=np.uint8)
        base.ggml_backend_tensor_get(node.src[1], buf.ctypes.data, 0, size)
        ne, nb = list(src.ne), list(src.nb)
        rows = np.lib.stride_tricks.as_strided(buf.view(np.float32), shape=(ne[3], ne[2], ne[1], ne[0]),
                                               strides=(nb[3], nb[2], nb[1], nb[0]))
        on_rows(name, np.array(rows, dtype=np.float32).reshape(-1, ne[0]))
        return True  # False would stop the computation

    return llama().ggml_backend_sched_eval_callback(callback)
