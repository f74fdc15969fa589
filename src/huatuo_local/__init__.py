"""huatuo-local: HuatuoGPT-Vision on your own machine, offline, through llama.cpp.

The package is one namespace over the repository's top-level folders:
`huatuo_local.models` (models/), `huatuo_local.convert` (convert/), `huatuo_local.runtime`
(runtime/).
"""

from huatuo_local.native import bounded_openmp_spin, cpp_runtime_global
from huatuo_local.version import __version__

# Before anything can import llama_cpp (see huatuo_local/native.py: CUDA builds crashed at every model
# load when numpy came first). Cheap: the C++ runtime is already mapped in any process using numpy.
cpp_runtime_global()
# Before llama.cpp's CPU backend loads libgomp: idle OpenMP threads sleep soon instead of spinning (issue 33).
bounded_openmp_spin()


def __getattr__(name: str):
    # Lazy, so that `import huatuo_local` does not load llama.cpp.
    if name == "HuatuoChatbot":
        from huatuo_local.runtime.api import HuatuoChatbot

        return HuatuoChatbot
    raise AttributeError(name)


__all__ = ["HuatuoChatbot", "__version__"]
