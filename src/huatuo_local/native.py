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


# How long (in pause-loop iterations) an idle OpenMP thread of llama.cpp's CPU backend spins before it
# sleeps. See `bounded_openmp_spin`; measured in bench/cpu_wait.py (BENCHMARKS.md). Not 100: a thread that
# sleeps at nearly every one of a token's ~700 barriers waits for the kernel (and the hypervisor) to wake it,
# and one direct measurement at the 7B's full depth decoded 25% slower with 100 than with 1000 or libgomp's
# default on a quiet 2-core VM. 1000 still sleeps within microseconds when another program wants the core.
OPENMP_SPIN = "1000"


def bounded_openmp_spin() -> str | None:
    """Load libgomp with a short spin before sleeping, unless the user chose a wait policy themselves.

    Why (issue 33): llama.cpp's CPU backend is built with OpenMP, and every barrier between two graph
    operations is an OpenMP barrier. libgomp spins 300,000 iterations at a barrier before it sleeps,
    but only 100 when it manages more threads than the process may use CPUs. So the same answer ran
    in two regimes: after an image was encoded, the encoder thread's OpenMP team made the process
    "oversubscribed" (short spins), while an answer whose image came from the prefix cache had one
    team (long spins). On a busy CPU a spinning thread burns the time slice its descheduled partner
    needs: cache hits took 5-20x the CPU time of misses per token. With a short spin both paths
    behave alike, and alike whether or not other programs load the machine.

    libgomp reads its settings once, when it is first loaded; this loads it now with the setting and
    restores the environment, so child processes (llama.cpp's own tools in the benchmarks) keep
    libgomp's defaults. A no-op when libgomp is already loaded, absent, or OMP_WAIT_POLICY /
    GOMP_SPINCOUNT are set. HUATUO_LOCAL_OPENMP_SPIN=default keeps libgomp's defaults (benchmarks).
    """
    if not sys.platform.startswith("linux"):
        return None
    spin = os.environ.get("HUATUO_LOCAL_OPENMP_SPIN", OPENMP_SPIN)
    if spin == "default" or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return None
    if _mapped("/libgomp.so.1"):
        return None  # too late to change (another library loaded it first): its settings stand
    os.environ["GOMP_SPINCOUNT"] = spin
    try:
        ctypes.CDLL("libgomp.so.1")
    except OSError:
        return None
    finally:
        del os.environ["GOMP_SPINCOUNT"]
    return spin


def _mapped(name: str) -> bool:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any(line.rstrip().endswith(name) for line in maps)
    except OSError:
        return False
