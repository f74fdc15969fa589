"""How llama.cpp's libraries enter this process: the C++ runtime first, in the global scope.

Why (issue 20, measured on an H200 with CUDA 13): llama.cpp's CUDA backend library
(`libggml-cuda.so`, built by nvcc) carries and exports its own instances of C++ standard-library
templates such as `std::ostream::_M_insert<long>`. When a program has imported numpy (or torch,
pandas ...) before llama.cpp is loaded, libllama's calls into the C++ runtime were bound to those
copies, and the first one (`llama_model::print_info` printing a number while the model loads)
crashed: every model load segfaulted, at `-ngl 0` too. With `libstdc++.so.6` in the process's
*global* symbol scope, the dynamic linker resolves every such call to the real C++ runtime
before it looks at any library's own exports, whatever was imported first. That is what
`LD_PRELOAD=libstdc++.so.6` did in the measurements; `load_llama_cpp` does it from inside the
process, before `llama_cpp` is imported (and it also holds for bindings made later, since the
global scope is searched first). CPU builds never had the problem; the promotion is harmless there.

`huatuo_local/__init__.py` calls it, so it runs before any of huatuo-local's modules (all of which
live under that package) can load llama.cpp. HUATUO_LOCAL_NO_CPP_GLOBAL=1 skips it (diagnosis only).
"""

from __future__ import annotations

import ctypes
import os
import sys

_CPP_RUNTIME = "libstdc++.so.6"


def cpp_runtime_global() -> str | None:
    """Put the C++ runtime in the global symbol scope (a no-op where it is not a separate library)."""
    if not sys.platform.startswith("linux") or os.environ.get("HUATUO_LOCAL_NO_CPP_GLOBAL") == "1":
        return None  # macOS' libc++ and Windows' runtimes are not interposed this way
    try:
        # By soname, as libllama itself names it; promotes an already loaded copy to the global scope.
        ctypes.CDLL(_CPP_RUNTIME, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return _CPP_RUNTIME
