"""llama.cpp's own tools (`llama-bench`, `llama-mtmd-cli`, `llama-server`, `llama-imatrix`,
`llama-quantize`), from the same build as the installed engine.

scripts/engine_build.py builds the engine's libraries and these tools in one CMake build of the
fixed source (so the bench compares our runtime with llama.cpp's tools on identical kernels, and
a CUDA machine compiles its kernels once); setup records where they are.

    .venv/bin/python bench/llama_tools.py        # prints the bin folder
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import engine_build  # noqa: E402

TARGETS = engine_build.TOOLS


def run_tool(bin_dir: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run one of the built tools (`args[0]`) with its own libraries; RuntimeError with the end of its
    stderr when it fails."""
    proc = subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, errors="replace",
                          timeout=timeout, env=dict(os.environ, LD_LIBRARY_PATH=str(bin_dir)))
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]}: {proc.stderr[-800:]}")
    return proc


def tools_dir() -> Path:
    """The bin folder of the build of the engine this Python imports: recorded in the installed package
    (llama_cpp/huatuo-engine.json, wherever pip put it), else by setup in the virtual environment, else the
    cached build for the current CMAKE_ARGS (engines built before the package carried the record)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    places = [Path(p) / engine_build.ENGINE_MARKER for p in (spec.submodule_search_locations or [])] if spec else []
    for marker in [*places, Path(sys.prefix) / engine_build.ENGINE_MARKER]:
        try:
            return Path(json.loads(marker.read_text())["tools"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    args = engine_build.engine_cmake_args(os.environ.get("CMAKE_ARGS"))
    return engine_build.engine_dir(engine_build.build_key(args)) / "bin"


def bin_folder() -> Path:
    """The tools' bin folder; setup builds them with the engine."""
    bin_dir = tools_dir()
    missing = [t for t in TARGETS if not (bin_dir / t).is_file()]
    if missing:
        raise SystemExit(f"llama.cpp's tools ({', '.join(missing)}) are missing from {bin_dir}: they are built with "
                         "the engine; run python3 scripts/bootstrap.py")
    return bin_dir


if __name__ == "__main__":
    print(bin_folder())
