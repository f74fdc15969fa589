#!/usr/bin/env python3
"""Set up huatuo-local: build the fixed llama.cpp engine once, then install everything.

    python3 scripts/bootstrap.py            # .venv with huatuo-local, engine, test tools
    python3 scripts/bootstrap.py --no-dev   # users: engine + huatuo-local only

llama-cpp-python ships no wheel, and the llama.cpp it vendors encodes LLaVA images
wrongly. scripts/engine_build.py downloads the pinned source distribution, applies our one-line
fix (scripts/fix_llava_concat.py), builds llama.cpp once (the libraries and llama.cpp's own
tools, which the benchmarks compare against) and caches a wheel outside the repository, keyed
by version, fix and build flags, so the next setup on this machine takes seconds.
On a machine with an NVIDIA GPU (its driver loaded) and the CUDA toolkit (nvcc), the engine is
built for CUDA; `--cpu-only` builds for the CPU. `CMAKE_ARGS` passes through and decides instead
when set (e.g. CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90", or "-DGGML_METAL=on"
for Metal on macOS, which is llama.cpp's default there). Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
# fetch_sdist too: scripts that prepare an offline machine call bootstrap.fetch_sdist
from engine_build import (  # noqa: E402, F401
    ENGINE_MARKER,
    BuildError,
    build_engine,
    build_key,
    engine_cmake_args,
    failure,
    fetch_sdist,
    install,
    run,
)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def main() -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 (this script runs on whatever python3 the user has)
        print("error: huatuo-local needs Python 3.10 or newer", file=sys.stderr)
        return 1
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv", help="virtual environment to create or update")
    ap.add_argument("--no-dev", action="store_true", help="skip test and benchmark tools (torch, transformers, ...)")
    ap.add_argument("--skip-first-run", action="store_true", help="do not run the self-test after installing")
    ap.add_argument("--cpu-only", action="store_true", help="build the engine for the CPU even where a GPU is found")
    args = ap.parse_args()

    venv = args.venv.resolve()
    python = venv_python(venv)
    if not python.exists():
        run([sys.executable, "-m", "venv", venv])
    run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])

    cmake_args = engine_cmake_args(os.environ.get("CMAKE_ARGS"), args.cpu_only)
    key = build_key(cmake_args)
    marker = venv / ENGINE_MARKER
    installed = json.loads(marker.read_text()) if marker.is_file() else {}
    tools = installed.get("tools")
    if installed.get("key") != key or not (tools and Path(tools).is_dir()):  # a deleted cache: build again
        try:
            install(python, build_engine(python, cmake_args, key), key, cmake_args, venv=venv)
        except (BuildError, subprocess.CalledProcessError) as exc:
            print(failure(exc), file=sys.stderr)
            return 1
    else:
        print(f"engine: {key} already installed in {venv}")

    extras = "" if args.no_dev else "[dev]"
    run([python, "-m", "pip", "install", "-q", "-e", f"{ROOT}{extras}"])
    if not args.no_dev:
        browser_for_tests()
    return first_run(venv, args.skip_first_run)


BROWSER_PACKAGES = ["chromium", "fonts-noto-cjk"]  # the page's browser test; CJK fonts so Chinese renders


def browser_for_tests() -> None:
    """The page's test drives the system's Chromium through Playwright; Playwright downloads no browser.

    On Debian/Ubuntu as root (CI, containers) the packages are installed here; elsewhere the
    command to run is printed, and the browser test fails until the browser is there.
    """
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    apt = shutil.which("apt-get")
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run([apt, "update", "-qq"], check=True, env=env)
        subprocess.run([apt, "install", "-y", "-qq", "--no-install-recommends", *BROWSER_PACKAGES], check=True,
                       env=env)
        return
    print("note: the page's browser test needs Chromium: sudo apt-get install " + " ".join(BROWSER_PACKAGES)
          + " (or your system's chromium package)")


def first_run(venv: Path, skip: bool) -> int:
    """Prove the install end to end, then do the main job if the model is already here.

    The real model is ~15 GB to download and convert, so setup never fetches it by itself;
    it says the one command that does.
    """
    cli = venv / ("Scripts/huatuo-local.exe" if os.name == "nt" else "bin/huatuo-local")
    example = ROOT / "examples" / "chest_ct.png"
    question = "What does this image show?"
    if skip:
        print(f"\nhuatuo-local is ready: {cli} doctor")
        return 0
    run([cli, "doctor", "--selftest"])
    has_model = subprocess.run([cli, "info", "huatuo-vision-7b"], capture_output=True).returncode == 0
    if has_model:
        run([cli, "chat", example, "-p", question])
    else:
        print("\nhuatuo-local is ready. To chat with HuatuoGPT-Vision-7B (downloads ~15 GB once, then works offline):\n"
              f"  {cli} pull huatuo-vision-7b\n  {cli} chat {example} -p \"{question}\"\n"
              "On a machine without access to Hugging Face, copy the checkpoint over and run\n"
              f"  {cli} pull CHECKPOINT_FOLDER --name huatuo-vision-7b  then  {cli} chat {example} -p ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
