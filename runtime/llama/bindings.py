"""The llama-cpp-python modules, imported when first needed (importing huatuo-local loads no library)."""

from __future__ import annotations


def llama():
    """llama-cpp-python's `llama_cpp` (libllama and libggml)."""
    import llama_cpp

    return llama_cpp


def mtmd():
    """llama-cpp-python's `mtmd_cpp` (libmtmd, the multimodal library that encodes images)."""
    from llama_cpp import mtmd_cpp

    return mtmd_cpp
