"""What `huatuo-local doctor` reports: the engine build, the vision probe, RAM, what fits."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from huatuo_local.models.registry import KNOWN_MODELS

GIB = 1024**3


@dataclass
class Report:
    version: str
    engine_version: str
    engine_build: dict
    system_info: str
    gpu_offload: bool
    probe: dict
    ram_total_gib: float
    ram_available_gib: float
    fits: dict[str, dict[str, bool]]
    recommended: dict
    physical_cores: int = 0
    logical_cores: int = 0
    rpc: bool = False  # llama.cpp's RPC backend built in (huatuo-local rpc-worker, --rpc)
    workers: list[dict] | None = None  # doctor --rpc: each worker's memory, and what fits across them


def memory_gib() -> tuple[float, float]:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        avail = int(info["MemAvailable"].split()[0]) * 1024
        return total / GIB, avail / GIB
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total / GIB, total / GIB


def engine_build() -> dict:
    """What scripts/bootstrap.py recorded about the installed engine wheel."""
    marker = Path(sys.prefix) / "huatuo-engine.json"
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}


def fits_across(free_bytes: float) -> dict[str, dict[str, bool]]:
    """Which quant of each known model fits in this much memory."""
    return {m.name: {q: m.ram_needed_gib(q) <= free_bytes / GIB for q in m.llm_gib} for m in KNOWN_MODELS.values()}


def gather(run_probe: bool = True, rpc_endpoints: list[str] | None = None) -> Report:
    import llama_cpp

    from huatuo_local import __version__

    from .engine import physical_cores, quiet_logs
    from .probe import check_library

    quiet_logs()
    system = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    from . import rpc

    gpu = rpc.local_gpu()  # llama_supports_gpu_offload() says yes for an RPC build without a GPU
    probe = check_library().__dict__ if run_probe else {}
    total, avail = memory_gib()
    fits = {
        m.name: {q: m.ram_needed_gib(q) <= avail for q in m.llm_gib}
        for m in KNOWN_MODELS.values()
    }
    workers = None
    usable = fits  # what the recommendation is made from: this machine, or it with its RPC workers
    if rpc_endpoints:
        found = [rpc.probe(ep) for ep in rpc_endpoints]
        together = avail * GIB + sum(w.free for w in found)
        usable = fits_across(together)
        workers = [{"endpoint": w.endpoint, "free_gib": w.free / GIB, "total_gib": w.total / GIB} for w in found]
        workers.append({"endpoint": "together with this machine", "free_gib": together / GIB, "fits": usable})
    best = {}
    for m in KNOWN_MODELS.values():
        ok = [q for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M") if usable[m.name].get(q)]
        best[m.name] = ok[0] if ok else None
    recommended = {"n_gpu_layers": -1 if gpu else 0, "threads": physical_cores(), "quant": best}
    return Report(__version__, llama_cpp.__version__, engine_build(), system, gpu, probe, total, avail, fits,
                  recommended, physical_cores(), os.cpu_count() or 1, rpc.available(), workers)
