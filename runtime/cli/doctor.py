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
    gpus: list[dict] | None = None  # each GPU llama.cpp sees: name, card, free and total GiB
    placements: dict[str, str] | None = None  # installed model → where it goes by default (one line)


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
    from huatuo_local.runtime.engine.probe import check_library
    from huatuo_local.runtime.llama.logs import quiet_logs
    from huatuo_local.runtime.system import memory_gib, physical_cores

    from huatuo_local import __version__

    quiet_logs()
    system = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    from huatuo_local.runtime.llama.devices import local_gpus
    from huatuo_local.runtime.rpc import client as rpc

    found_gpus = local_gpus()  # not llama_supports_gpu_offload(): it says yes for an RPC build without a GPU
    gpu = bool(found_gpus)
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
                  recommended, physical_cores(), os.cpu_count() or 1, rpc.available(), workers,
                  [{"name": g.name, "description": g.description, "free_gib": g.free / GIB, "total_gib": g.total / GIB}
                   for g in found_gpus], placements(found_gpus))


def placements(gpus) -> dict[str, str]:
    """Where each installed model goes by default on these GPUs (nothing to say without one)."""
    if not gpus:
        return {}
    from huatuo_local.models.gguf_check import check_gguf
    from huatuo_local.models.store import list_models
    from huatuo_local.runtime.engine.engine import DEFAULT_CTX
    from huatuo_local.runtime.llama.devices import plan_offload

    out = {}
    for m in list_models():
        try:
            out[m.ref] = plan_offload(check_gguf(m.llm_path, "llm"), check_gguf(m.mmproj_path, "mmproj"), gpus,
                                      DEFAULT_CTX).note
        except Exception as exc:  # a damaged model is reported, the report goes on
            out[m.ref] = f"unreadable ({exc})"
    return out
