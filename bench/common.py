"""Shared bench helpers: machine description, versions, and appending results to BENCHMARKS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# HUATUO_BENCH_FILE: append the sections elsewhere (scripts/gpu_check.py collects a lent machine's there).
BENCHMARKS = Path(os.environ.get("HUATUO_BENCH_FILE") or ROOT / "BENCHMARKS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = " ".join(f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16")
                                 if f in have)
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 1024**2:.1f} GiB RAM"
    except (OSError, IndexError, ValueError):
        pass
    gpus = ""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
            gpus = "; GPU " + ", ".join(line.strip() for line in out.splitlines() if line.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{cpu} ({flags}), {os.cpu_count()} cores, {mem}, {platform.system()} {platform.release()}{gpus}"


def write_json(path: Path | None, data: dict) -> None:
    """A script's measured figures as JSON (`--json FILE`), with the machine and the date, for a run whose
    BENCHMARKS.md stays on another machine (scripts/gpu_check.py)."""
    if path is None:
        return
    import json

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    Path(path).write_text(json.dumps({"machine": machine(), "date": stamp, "command": invocation(), **data},
                                     indent=2, default=str))


def versions() -> str:
    from importlib.metadata import version

    import llama_cpp
    import numpy

    from huatuo_local.version import __version__

    return (f"huatuo-local {__version__}, llama-cpp-python {llama_cpp.__version__} (with the LLaVA fix), "
            f"gguf {version('gguf')}, numpy {numpy.__version__}, "
            f"Python {platform.python_version()}")


def invocation() -> str:
    """This script's command line, as a user would type it from the repository root."""
    return shlex.join([".venv/bin/python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def append(title: str, command: str, table: str, notes: str = "") -> None:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"\n## {title} ({stamp})\n\n- Machine: {machine()}\n- Versions: {versions()}\n"
             f"- Command: {command}\n\n{table}\n" + (f"\n{notes}\n" if notes else ""))
    if not BENCHMARKS.exists():
        BENCHMARKS.write_text("# Benchmarks\n\nEach section is appended by a script in `bench/`; "
                              "newest last.\n")
    with open(BENCHMARKS, "a", encoding="utf-8") as f:
        f.write(block)
    print(block)


def run_measured(code: str, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run Python code in a fresh process; it must print one JSON line last. Adds peak RSS."""
    import json

    # VmHWM, not ru_maxrss: the latter keeps the forking parent's size from before exec.
    wrapper = code + ("\nimport json as _j\n"
                      "_hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
                      "print(_j.dumps({'peak_rss_kib': int(_hwm)}))\n")
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, errors="replace",
                          timeout=timeout,
                          env=dict(os.environ, **(env or {})), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out: dict = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            out.update(json.loads(line))
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers and workers in benches listen on loopback only)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
