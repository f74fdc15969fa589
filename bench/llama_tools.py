"""Build llama.cpp's own tools (`llama-bench`, `llama-mtmd-cli`, `llama-server`, `llama-imatrix`,
`llama-quantize`) from the engine's source and fix.

Same source distribution, same one-line LLaVA fix as `scripts/bootstrap.py`; built once into
~/.cache/huatuo-local/llama-tools/KEY/ (outside the repository), so the bench compares our
runtime with llama.cpp's tools on identical kernels.

    .venv/bin/python bench/llama_tools.py        # prints the bin folder
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bootstrap  # noqa: E402
from fix_llava_concat import apply_fix  # noqa: E402

TARGETS = ("llama-bench", "llama-mtmd-cli", "llama-server", "llama-imatrix", "llama-quantize")


def run_tool(bin_dir: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run one of the built tools (`args[0]`) with its own libraries; RuntimeError with the end of its
    stderr when it fails."""
    proc = subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, errors="replace",
                          timeout=timeout, env=dict(os.environ, LD_LIBRARY_PATH=str(bin_dir)))
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]}: {proc.stderr[-800:]}")
    return proc


def tools_dir() -> Path:
    return bootstrap.cache_root().parent / "llama-tools" / bootstrap.build_key(os.environ.get("CMAKE_ARGS", ""))


def build() -> Path:
    out = tools_dir()
    bin_dir = out / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    sdist = bootstrap.fetch_sdist(Path(sys.executable))
    src = out / "src"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    prefix = f"llama_cpp_python-{bootstrap.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(src, members=members, filter="data")
    print(f"llama-tools: LLaVA fix {apply_fix(src)}", flush=True)
    build_dir = out / "build"
    cmake_args = os.environ.get("CMAKE_ARGS", "").split()
    subprocess.run(["cmake", "-S", src, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON",
                    # The default downloads prebuilt web-UI assets; without them the server builds offline.
                    "-DLLAMA_USE_PREBUILT_UI=OFF", *cmake_args], check=True)
    subprocess.run(["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 2), "--target", *TARGETS],
                   check=True)
    bin_dir.mkdir()
    for t in TARGETS:
        shutil.copy2(build_dir / "bin" / t, bin_dir / t)
    for lib in (build_dir / "bin").glob("*.so*"):
        shutil.copy2(lib, bin_dir / lib.name)
    shutil.rmtree(src)
    return bin_dir


if __name__ == "__main__":
    print(build())
