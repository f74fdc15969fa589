"""Build the fixed llama.cpp engine: one CMake build gives the libraries huatuo-local loads and
llama.cpp's own tools, cached outside the repository.

    python3 scripts/engine_build.py                       # build (or find) it; prints the wheel and tools
    CMAKE_ARGS="-DGGML_CUDA=on" python3 scripts/engine_build.py
    python3 scripts/engine_build.py --source DIR          # offline: an unpacked llama-cpp-python sdist
    python3 scripts/engine_build.py --install             # and pip-install it for this Python

Why one standalone build: llama-cpp-python's own CMake tree builds only the libraries (its
llama.cpp is a subproject, so the tools are off and cannot be switched on there), so the tools
the benchmarks compare against needed a second compile of the same source — on a CUDA machine
two compiles of every kernel (about 4 minutes each on 16 cores). Here the vendored llama.cpp is
configured standalone, as its own README builds it, with our LLaVA fix applied; the libraries
(libllama, libmtmd, libggml*) and the tools (llama-bench, llama-mtmd-cli, llama-server,
llama-imatrix, llama-quantize) come out of that one build with identical kernels. The Python
bindings are llama-cpp-python's own files from the same source distribution, packed with those
libraries into one wheel (`llama_cpp/lib/`, where llama-cpp-python looks for them), so pip
installs and uninstalls it like any other. Only the standard library is used.

The cache: ~/.cache/huatuo-local/engine/wheels/KEY/ holds the wheel, build.json and bin/ (the
tools beside the libraries they link). KEY covers the version, the fix, CMAKE_ARGS, this build's
own CMake files (engine_exports.cmake and its version script), Python, the machine and the CPU's
instruction sets (a native build only runs on the same ones).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fix_llava_concat import FIX_ID, apply_fix  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep in step with pyproject.toml
LAYOUT = "standalone-v1"  # how the wheel is made; part of the cache key
LIBRARIES = ("llama", "mtmd")  # what huatuo-local loads (they pull in libggml and its backends)
TOOLS = ("llama-bench", "llama-mtmd-cli", "llama-server", "llama-imatrix", "llama-quantize")
# Loaded by file name by llama-cpp-python (llama_cpp.py, mtmd_cpp.py, _ggml.py): the wheel holds
# these under their plain names as well as their sonames (a wheel cannot hold symlinks).
LOADED_BY_PATH = ("libllama", "libmtmd", "libggml")
# Run at the end of llama.cpp's CMake configuration: its GPU and RPC backends export their C interface only.
EXPORTS_CMAKE = HERE / "engine_exports.cmake"
EXPORTS_MAP = HERE / "ggml_backend_exports.map"  # the version script it applies
ENGINE_MARKER = "huatuo-engine.json"  # in a virtual environment: which build is installed there
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")  # there while NVIDIA's kernel driver is loaded


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
        "layout": LAYOUT,
        "cmake_args": cmake_args,
        # The build's own CMake additions: an edit to them is a different engine.
        "exports": hashlib.sha256(EXPORTS_CMAKE.read_bytes() + EXPORTS_MAP.read_bytes()).hexdigest(),
        "python": f"cp{sys.version_info.major}{sys.version_info.minor}",
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu": "" if "GGML_NATIVE=OFF" in cmake_args.upper() else cpu_signature(),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{LLAMA_CPP_PYTHON_VERSION}-{digest}"


def nvidia_gpu() -> str | None:
    """nvcc, when this machine can both build for and run on an NVIDIA GPU (the driver is loaded):
    a toolkit alone (a build box, a CI runner) is not a reason to build for CUDA."""
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).is_file()), None)
    return nvcc if nvcc and NVIDIA_DRIVER.is_file() else None


def cuda_architectures() -> str | None:
    """The compute capabilities of this machine's NVIDIA GPUs as CMake wants them ("90" for an H100/H200), from
    nvidia-smi; None when it cannot say. Pinned rather than left to CMake's `native` detection, which fails
    quietly in some containers and then compiles for every architecture (several times the build time)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = sorted({c.strip().replace(".", "") for c in out.splitlines() if c.strip().replace(".", "").isdigit()})
    return ";".join(caps) or None


def engine_cmake_args(user: str | None, cpu_only: bool = False) -> str:
    """The build flags: the user's CMAKE_ARGS when set (CUDA, Metal ...), else CUDA when this machine
    has an NVIDIA GPU and its toolkit (a GPU user who runs the plain setup gets the GPU), plus
    llama.cpp's RPC backend (huatuo-local rpc-worker, --rpc). A CUDA build is pinned to the architectures of
    the GPUs present when the flags do not name them."""
    args = (user or "").strip()
    if user is None and not cpu_only:
        nvcc = nvidia_gpu()
        if nvcc:
            args = f"-DGGML_CUDA=on -DCMAKE_CUDA_COMPILER={nvcc}"
            print(f"engine: an NVIDIA GPU and {nvcc} found: building for CUDA (--cpu-only, or CMAKE_ARGS='', "
                  "builds for the CPU)", flush=True)
    upper = args.upper()
    if "GGML_CUDA=ON" in upper and "CMAKE_CUDA_ARCHITECTURES" not in upper:
        arch = cuda_architectures()
        if arch:
            args += f" -DCMAKE_CUDA_ARCHITECTURES={arch}"
    if "GGML_RPC" not in args.upper():
        args = (args + " -DGGML_RPC=ON").strip()
    return args


def cuda_library_dirs(cmake_args: str) -> list[str]:
    """Where the CUDA toolkit's runtime libraries (libcudart, libcublas) are, for a CUDA build: put in the
    libraries' and tools' RPATH so that they load where the loader cache does not list the toolkit."""
    if "GGML_CUDA=ON" not in cmake_args.upper():
        return []
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    root = Path(nvcc).resolve().parent.parent
    return [str(d) for d in (root / "lib64", root / "targets" / "x86_64-linux" / "lib", root / "lib")
            if d.is_dir()]


def engine_dir(key: str) -> Path:
    return cache_root() / "wheels" / key


def run(cmd: list, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def sdist_path() -> Path:
    """Where the pinned source distribution is cached (fetch_sdist puts it there)."""
    return cache_root() / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"


def fetch_sdist(python: Path) -> Path:
    sdist = sdist_path()
    sdist.parent.mkdir(parents=True, exist_ok=True)
    if not sdist.is_file():
        run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", sdist.parent])
    return sdist


class BuildError(Exception):
    """The engine cannot be built as asked; the message says why in one line."""


def source_version(src: Path) -> str:
    """The llama-cpp-python version of an unpacked source distribution (its PKG-INFO)."""
    try:
        for line in (src / "PKG-INFO").read_text(encoding="utf-8").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown (no PKG-INFO)"


@dataclass(frozen=True)
class Engine:
    wheel: Path  # llama-cpp-python with the fixed libraries, for pip
    tools: Path  # llama.cpp's tools from the same build, beside their libraries


def cached(key: str) -> Engine | None:
    out = engine_dir(key)
    wheels = sorted(out.glob("*.whl")) if out.is_dir() else []
    if wheels and all((out / "bin" / t).is_file() for t in TOOLS):
        return Engine(wheels[0], out / "bin")
    return None


def build_engine(python: Path, cmake_args: str, key: str, source: Path | None = None,
                 build_dir: Path | None = None) -> Engine:
    """The engine for `key`: from the cache, or built from the pinned source distribution
    (or `source`, an unpacked one, for a machine without network). With `build_dir` the source copy and the
    CMake tree are kept there, so a build that was cut (a time limit, Ctrl-C) resumes where it stopped."""
    found = cached(key)
    if found:
        print(f"engine: cached wheel {found.wheel}")
        return found
    out = engine_dir(key)
    with contextlib.ExitStack() as stack:
        if build_dir is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="huatuo-engine-")))
        else:
            tmp = build_dir / key  # another key (other flags) is another tree
            tmp.mkdir(parents=True, exist_ok=True)
        src = tmp / "src"
        if not (src / "PKG-INFO").is_file():  # kept from a cut build: the same source, its mtimes intact
            shutil.rmtree(src, ignore_errors=True)
            if source is None:
                with tarfile.open(fetch_sdist(python)) as tar:
                    tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
                (tmp / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}").rename(src)
            else:
                shutil.copytree(source, src, symlinks=True)
        version = source_version(src)
        if version != LLAMA_CPP_PYTHON_VERSION:  # the cache key would name another build than this one
            raise BuildError(f"{source or 'the source distribution'} is llama-cpp-python {version}; this "
                             f"huatuo-local pins {LLAMA_CPP_PYTHON_VERSION}")
        outcome = apply_fix(src / "vendor" / "llama.cpp")
        print(f"engine: LLaVA class-token fix {outcome}")
        build = tmp / "build"
        cmake(src / "vendor" / "llama.cpp", build, cmake_args)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        marker = {"key": key, "tools": str(out / "bin"), "cmake_args": cmake_args}
        wheel = write_wheel(src, build / "bin", staging, marker)
        shutil.copytree(build / "bin", staging / "bin", symlinks=True)
        (staging / "build.json").write_text(json.dumps(
            {"version": LLAMA_CPP_PYTHON_VERSION, "fix": FIX_ID, "fix_outcome": outcome, "layout": LAYOUT,
             "cmake_args": cmake_args}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return Engine(out / wheel.name, out / "bin")


def build_tool(name: str) -> str:
    """cmake or ninja: on PATH, else from the Python package of that name (pip's cmake and ninja wheels, all a
    machine without network may have)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        module = __import__(name)
        folder = Path(getattr(module, "CMAKE_BIN_DIR", None) or module.BIN_DIR)
        if (folder / name).is_file():
            return str(folder / name)
    except (ImportError, AttributeError, TypeError):
        pass
    return name if name == "cmake" else ""


def cmake(llama_cpp: Path, build: Path, cmake_args: str) -> None:
    """One standalone build of the libraries and the tools."""
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
    print(f"engine: building llama.cpp and its tools (about 6 minutes on 2 cores, once per machine; {jobs} jobs)",
          flush=True)
    # Ninja where it is installed: it starts compiling sooner and keeps every core busy (make's recursion
    # does not); a tree configured before keeps its generator.
    ninja_bin = build_tool("ninja")
    ninja = (["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja_bin}"]
             if ninja_bin and not (build / "CMakeCache.txt").is_file() else [])
    cmake_bin = build_tool("cmake")
    rpath = ["$ORIGIN" if sys.platform != "darwin" else "@loader_path", *cuda_library_dirs(cmake_args)]
    run([cmake_bin, "-S", llama_cpp, "-B", build, *ninja, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
         # The default downloads prebuilt web-UI assets; without them the server builds offline.
         "-DLLAMA_USE_PREBUILT_UI=OFF",
         # Libraries and tools find each other beside themselves, wherever the files are copied.
         "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
         "-DCMAKE_INSTALL_RPATH=" + ";".join(rpath),
         # No C++ runtime symbol exported from a backend library (issue 20's crash; see the file).
         f"-DCMAKE_PROJECT_INCLUDE={EXPORTS_CMAKE}",
         *cmake_args.split()])
    run([cmake_bin, "--build", build, "-j", jobs, "--target", *LIBRARIES, *TOOLS])


def _soname_files(bin_dir: Path) -> dict[str, Path]:
    """The engine's libraries in the wheel: each under its soname (libllama.so.0: what the others
    need), and the ones llama-cpp-python opens by file name under that name too (libllama.so)."""
    files: dict[str, Path] = {}
    for link in sorted(bin_dir.glob("lib*.so*")) + sorted(bin_dir.glob("lib*.dylib")):
        name = link.name
        stem = name.split(".", 1)[0]
        if not (stem.startswith("libggml") or stem in ("libllama", "libmtmd")):
            continue  # the tools' own libraries (libllama-common, libllama-server-impl ...)
        real = link.resolve()
        plain = name.endswith((".so", ".dylib"))
        versioned = name.count(".") == 2 and name.startswith(stem + ".so.")  # libllama.so.0: the soname
        if versioned or (plain and stem in LOADED_BY_PATH) or (plain and not link.is_symlink()):
            files[name] = real
    return files


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def write_wheel(src: Path, bin_dir: Path, out_dir: Path, marker: dict | None = None) -> Path:
    """llama-cpp-python's `llama_cpp` package from `src` plus the built libraries, as a wheel; `marker`
    (which build, where its tools are) goes in as llama_cpp/huatuo-engine.json, so whatever installs the wheel
    (a venv, pip --target) can find the tools of the build it holds."""
    tag = "py3-none-" + sysconfig.get_platform().replace("-", "_").replace(".", "_")
    dist = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    wheel = out_dir / f"{dist}-{tag}.whl"
    entries: list[tuple[str, bytes]] = []
    for path in sorted((src / "llama_cpp").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.parent.name != "lib":
            entries.append((path.relative_to(src).as_posix(), path.read_bytes()))
    for name, real in _soname_files(bin_dir).items():
        entries.append((f"llama_cpp/lib/{name}", real.read_bytes()))
    if marker is not None:
        entries.append((f"llama_cpp/{ENGINE_MARKER}", json.dumps(marker, indent=2).encode()))
    info = f"{dist}.dist-info"
    entries.append((f"{info}/METADATA", (src / "PKG-INFO").read_bytes()))
    entries.append((f"{info}/WHEEL", (f"Wheel-Version: 1.0\nGenerator: huatuo-local engine_build ({LAYOUT})\n"
                                      f"Root-Is-Purelib: false\nTag: {tag}\n").encode()))
    entries.append((f"{info}/licenses/LICENSE.md", (src / "LICENSE.md").read_bytes()))
    record = [_record_line(name, data) for name, data in entries] + [f"{info}/RECORD,,"]
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zi.external_attr = (0o755 if "/lib/" in name else 0o644) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def install(python: Path, engine: Engine, key: str, cmake_args: str, target: Path | None = None,
            venv: Path | None = None) -> None:
    """pip-install the engine's wheel for `python` (or into `target`, a --target folder) and, when it
    is `venv`'s, record there which build it is (doctor shows it; bench/ finds the tools by it)."""
    cmd = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall"]
    run(cmd + (["--target", target, "--upgrade"] if target else []) + [engine.wheel])
    if venv is not None:
        (venv / ENGINE_MARKER).write_text(json.dumps(
            {"key": key, "wheel": str(engine.wheel), "tools": str(engine.tools), "cmake_args": cmake_args}, indent=2))


def failure(exc: BuildError | subprocess.CalledProcessError) -> str:
    """The one line for a build that could not finish."""
    if isinstance(exc, subprocess.CalledProcessError):
        return (f"error: building the engine failed at `{' '.join(map(str, exc.cmd[:4]))} ...` (exit "
                f"{exc.returncode}); the output above says why (a C/C++ compiler and CMake are needed)")
    return f"error: {exc}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, help="an unpacked llama-cpp-python source distribution (offline)")
    ap.add_argument("--install", action="store_true", help="pip-install the wheel for this Python")
    ap.add_argument("--target", type=Path, help="with --install: into this folder (pip install --target)")
    ap.add_argument("--cpu-only", action="store_true", help="build for the CPU even where a GPU is found")
    ap.add_argument("--build-dir", type=Path, help="keep the source copy and the CMake tree here: a build that was "
                    "cut resumes where it stopped (scripts/gpu_check.py uses it)")
    args = ap.parse_args()
    if args.source is not None and not (args.source / "vendor" / "llama.cpp").is_dir():
        print(f"error: {args.source} is not an unpacked llama-cpp-python source distribution (no "
              "vendor/llama.cpp inside); pass the folder the .tar.gz unpacks to", file=sys.stderr)
        return 2
    cmake_args = engine_cmake_args(os.environ.get("CMAKE_ARGS"), args.cpu_only)
    key = build_key(cmake_args)
    in_venv = args.target is None and sys.prefix != sys.base_prefix
    try:
        engine = build_engine(Path(sys.executable), cmake_args, key, args.source, args.build_dir)
        if args.install:
            install(Path(sys.executable), engine, key, cmake_args, args.target, Path(sys.prefix) if in_venv else None)
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(failure(exc), file=sys.stderr)
        return 1
    print(f"wheel {engine.wheel}\ntools {engine.tools}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
