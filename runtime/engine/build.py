"""The identity of the loaded llama.cpp build (what a saved KV state depends on)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from huatuo_local.runtime.llama.bindings import llama

_BUILD_ID: str | None = None


def engine_build_id() -> str:
    """A digest of the loaded llama.cpp libraries' bytes: another build may lay out KV state differently."""
    global _BUILD_ID
    if _BUILD_ID is None:
        llama_cpp = llama()
        h = hashlib.sha256(f"llama-cpp-python {llama_cpp.__version__}".encode())
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        for lib in sorted(lib_dir.glob("*")) if lib_dir.is_dir() else []:
            if lib.is_file():
                h.update(lib.name.encode())
                h.update(lib.read_bytes())
        _BUILD_ID = h.hexdigest()
    return _BUILD_ID
