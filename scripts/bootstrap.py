#!/usr/bin/env python3
"""Set up huatuo-local: build the fixed llama.cpp engine once, then install everything.

    python3 scripts/bootstrap.py            # .venv with huatuo-local, engine, test tools
    python3 scripts/bootstrap.py --no-dev   # users: engine + huatuo-local only

llama-cpp-python ships no wheel, and the llama.cpp it vendors encodes LLaVA images
wrongly. This script downloads the pinned source distribution, applies our one-line fix
(scripts/fix_llava_concat.py), builds a wheel and caches it outside the repository, keyed
by version, fix and build flags, so the next setup on this machine takes seconds.
`CMAKE_ARGS` passes through (e.g. CMAKE_ARGS="-DGGML_CUDA=on" for CUDA, "-DGGML_METAL=on"
for Metal on macOS, which is llama.cpp's default there). Only the standard library is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from fix_llava_concat import FIX_ID, apply_fix  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep in step with pyproject.toml
ENGINE_MARKER = "huatuo-engine.json"


def cache_root() -> Path:
    env = os.environ.get("HUATUO_LOCAL_WHEEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "huatuo-local" / "engine"


def cpu_signature() -> str:
    """A native build only runs on CPUs with the same instruction sets."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return hashlib.sha256(line.split(":", 1)[1].strip().encode()).hexdigest()[:12]
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_key(cmake_args: str) -> str:
    parts = {
        "version": LLAMA_CPP_PYTHON_VERSION,
        "fix": FIX_ID,
        "cmake_args": cmake_args,
        "python": f"cp{sys.version_info.major}{sys.version_info.minor}",
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu": "" if "GGML_NATIVE=OFF" in cmake_args.upper() else cpu_signature(),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{LLAMA_CPP_PYTHON_VERSION}-{digest}"


def engine_cmake_args(user: str) -> str:
    """The user's CMAKE_ARGS (CUDA, Metal ...) plus llama.cpp's RPC backend (huatuo-local rpc-worker, --rpc)."""
    args = user.strip()
    if "GGML_RPC" not in args.upper():
        args = (args + " -DGGML_RPC=ON").strip()
    return args


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def fetch_sdist(python: Path) -> Path:
    sdist_dir = cache_root() / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not (sdist_dir / name).is_file():
        run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", sdist_dir])
    return sdist_dir / name


def build_wheel(python: Path, cmake_args: str, key: str) -> Path:
    out = cache_root() / "wheels" / key
    wheels = sorted(out.glob("*.whl")) if out.is_dir() else []
    if wheels:
        print(f"engine: cached wheel {wheels[0]}")
        return wheels[0]
    sdist = fetch_sdist(python)
    with tempfile.TemporaryDirectory(prefix="huatuo-engine-") as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
        src = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
        outcome = apply_fix(src / "vendor" / "llama.cpp")
        print(f"engine: LLaVA class-token fix {outcome}")
        env = dict(os.environ, CMAKE_ARGS=cmake_args)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        print("engine: building llama-cpp-python (about 9 minutes on 2 cores, once per machine)")
        built = Path(tmp) / "dist"
        run([python, "-m", "pip", "wheel", "--no-deps", "-w", built, src], env=env)
        wheel = next(built.glob("*.whl"))
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy2(wheel, staging / wheel.name)
        (staging / "build.json").write_text(json.dumps(
            {"version": LLAMA_CPP_PYTHON_VERSION, "fix": FIX_ID, "fix_outcome": outcome,
             "cmake_args": cmake_args}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out / wheel.name


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
    args = ap.parse_args()

    venv = args.venv.resolve()
    python = venv_python(venv)
    if not python.exists():
        run([sys.executable, "-m", "venv", venv])
    run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])

    cmake_args = engine_cmake_args(os.environ.get("CMAKE_ARGS", ""))
    key = build_key(cmake_args)
    marker = venv / ENGINE_MARKER
    installed = json.loads(marker.read_text()) if marker.is_file() else {}
    if installed.get("key") != key:
        wheel = build_wheel(python, cmake_args, key)
        run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel])
        marker.write_text(json.dumps({"key": key, "wheel": str(wheel), "cmake_args": cmake_args}, indent=2))
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
