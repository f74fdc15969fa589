"""`huatuo-local doctor`: the engine build, the vision probe, GPUs, RAM and what fits, as text or JSON."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from huatuo_local.models.registry import GIB, KNOWN_MODELS
from huatuo_local.runtime.cli.app import app


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
    choices: dict[str, dict] | None = None  # known model → its best quant here, what it needs, what else fits
    backends: list[str] | None = None  # what the loaded engine was built with, from llama.cpp's registry
    idle_backends: list[str] | None = None  # GPU backends built in that found no device (CUDA without a driver)
    store: dict | None = None  # the home folder: models, their size, downloads, free disk


def engine_build() -> dict:
    """Which engine build is installed: recorded in the package itself (llama_cpp/huatuo-engine.json, wherever
    pip put it), else by scripts/bootstrap.py in the virtual environment."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    places = [Path(p) / "huatuo-engine.json" for p in (spec.submodule_search_locations or [])] if spec else []
    for marker in [*places, Path(sys.prefix) / "huatuo-engine.json"]:
        try:
            return json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
    return {}


def fits_across(free_bytes: float, gpu: bool = False) -> dict[str, dict[str, bool]]:
    """Which quant of each known model fits in this much memory (weights, KV cache for the default
    context, compute buffers and headroom: models/sizing.py)."""
    from huatuo_local.models.sizing import QUALITY_ORDER, best_quant

    out = {}
    for m in KNOWN_MODELS.values():
        fits = best_quant(m, int(free_bytes), gpu).fits
        out[m.name] = {q: q in fits for q in QUALITY_ORDER}
    return out


def choices(ram_free: float, gpu_free: float | None) -> dict[str, dict]:
    """Each known model's best quant here: in the GPUs' free memory when one fits there, else in RAM;
    what it needs, its measured cost against F16, what else fits, and what a smaller context would allow."""
    from huatuo_local.models.sizing import FreeMemory, machine_choice

    out = {}
    for m in KNOWN_MODELS.values():
        choice = machine_choice(m, FreeMemory(int(ram_free), int(gpu_free) if gpu_free else None))
        out[m.name] = {"quant": choice.quant, "where": choice.where, "summary": choice.describe(),
                       "need_gib": choice.need().total / GIB, "free_gib": choice.budget / GIB,
                       "also_fits": choice.fits[1:],
                       "stretch": ({"quant": choice.stretch[0], "ctx": choice.stretch[1], "kv_type": "q8_0"}
                                   if choice.stretch else None)}
    return out


def gather(run_probe: bool = True, rpc_endpoints: list[str] | None = None, rpc_key_file=None) -> Report:
    import llama_cpp
    from huatuo_local.runtime.engine.probe import check_library
    from huatuo_local.runtime.llama.logs import quiet_logs
    from huatuo_local.runtime.system import memory_gib, physical_cores

    from huatuo_local.version import __version__

    quiet_logs()
    system = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    from huatuo_local.runtime.llama.devices import built_backends, idle_backends, local_gpus
    from huatuo_local.runtime.rpc import client as rpc

    found_gpus = local_gpus()  # not llama_supports_gpu_offload(): it says yes for an RPC build without a GPU
    gpu = bool(found_gpus)
    probe = check_library().__dict__ if run_probe else {}
    total, avail = memory_gib()
    fits = fits_across(avail * GIB)
    best_here = choices(avail * GIB, sum(g.free for g in found_gpus) if found_gpus else None)
    workers = None
    usable = fits  # what the recommendation is made from: this machine, or it with its RPC workers
    if rpc_endpoints:
        found = [rpc.probe(ep, rpc_key_file) for ep in rpc_endpoints]
        together = avail * GIB + sum(w.free for w in found)
        usable = fits_across(together)
        workers = [{"endpoint": w.endpoint, "free_gib": w.free / GIB, "total_gib": w.total / GIB} for w in found]
        workers.append({"endpoint": "together with this machine", "free_gib": together / GIB, "fits": usable})
    best = {name: c["quant"] for name, c in best_here.items()}
    if rpc_endpoints:
        best = {name: next((q for q, ok in f.items() if ok), None) for name, f in usable.items()}
    recommended = {"n_gpu_layers": -1 if gpu else 0, "threads": physical_cores(), "quant": best}
    return Report(__version__, llama_cpp.__version__, engine_build(), system, gpu, probe, total, avail, fits,
                  recommended, physical_cores(), os.cpu_count() or 1, rpc.available(), workers,
                  [{"name": g.name, "description": g.description, "free_gib": g.free / GIB, "total_gib": g.total / GIB}
                   for g in found_gpus], placements(found_gpus), best_here, built_backends(), idle_backends(),
                  _store())


def _store() -> dict:
    from huatuo_local.models.store import leftovers, store_usage
    from huatuo_local.runtime.core import prefix_cache

    usage = store_usage()
    left = leftovers()
    return {"home": str(usage.home), "models": usage.models, "model_bytes": usage.model_bytes,
            "download_bytes": usage.download_bytes, "prefix_cache_bytes": prefix_cache.info().bytes,
            "free_disk_bytes": usage.free_bytes, "leftovers": [str(p) for p in left],
            "leftover_bytes": sum(p.stat().st_size for p in left)}


def placements(gpus) -> dict[str, str]:
    """Where each installed model goes by default on these GPUs (nothing to say without one)."""
    if not gpus:
        return {}
    from huatuo_local.models.store import list_models
    from huatuo_local.runtime.engine.placement import plan_placement

    out = {}
    for m in list_models():
        try:  # the plan a load with the default options makes (engine/placement.py)
            out[m.ref] = plan_placement(m.llm_path, m.mmproj_path, n_gpu_layers=None, gpus=gpus).note
        except Exception as exc:  # a damaged model is reported, the report goes on
            out[m.ref] = f"unreadable ({exc})"
    return out


def _store_line(store: dict) -> str:
    gib = 1024**3
    return (f"store            {store.get('home')}: {store.get('models', 0)} model(s), "
            f"{store.get('model_bytes', 0) / gib:.2f} GiB; downloads {store.get('download_bytes', 0) / gib:.2f} GiB; "
            f"prefix cache {store.get('prefix_cache_bytes', 0) / gib:.2f} GiB; "
            f"{store.get('free_disk_bytes', 0) / gib:.1f} GiB free on its disk")


def _leftover_lines(store: dict) -> list[str]:
    left = store.get("leftovers") or []
    if not left:
        return []
    return [f"leftovers        {len(left)} file(s), {store.get('leftover_bytes', 0) / 1024**3:.2f} GiB left by "
            "interrupted converts or pulls; `huatuo-local rm --leftovers` removes them"]


def _memory_lines(report: Report) -> list[str]:
    """Each model's best quant here (what else fits, what a smaller context allows), and the RPC workers."""
    lines = []
    for name, c in (report.choices or {}).items():
        lines.append(f"{name:<16} best here: {c['summary']}")
        if c["also_fits"]:
            lines.append(f"{'':<16} also fits: {', '.join(c['also_fits'])}")
        if c["stretch"]:
            st = c["stretch"]
            lines.append(f"{'':<16} with --ctx {st['ctx']} --kv-type {st['kv_type']}: {st['quant']} fits")
    for w in report.workers or []:
        if "fits" in w:
            for name, fits in w["fits"].items():
                ok = [q for q, f in fits.items() if f]
                lines.append(f"{name:<16} fits across the workers and this machine ({w['free_gib']:.1f} GiB "
                             f"free): {', '.join(ok) if ok else 'none'}")
        else:
            lines.append(f"RPC worker       {w['endpoint']}: {w['free_gib']:.1f} GiB free of "
                         f"{w['total_gib']:.1f} GiB")
    return lines


@app.command(epilog="Example: huatuo-local doctor --json")
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    selftest: Annotated[bool, typer.Option("--selftest", help="Also write, convert and chat with a tiny random "
                                                              "model (no download).")] = False,
    rpc: Annotated[str | None, typer.Option(help="Also ask these RPC workers (HOST:PORT,...) for their memory and "
                                            "show which quants fit across them and this machine.")] = None,
    rpc_key_file: Annotated[Path | None, typer.Option(help="With --rpc: the workers' key.")] = None,
) -> None:
    """Check the install: engine build, the LLaVA vision probe, GPU offload, RAM and what fits."""
    if selftest:
        from huatuo_local.runtime.cli import selftest as st

        result = st.run()
        where = "GPU (all layers)" if result.gpu_layers else "CPU"
        typer.echo(f"selftest         ok on {where}: converted a random model and generated {result.tokens} "
                   f"tokens in {result.seconds:.1f} s (random weights: the answer is meaningless)")

    from huatuo_local.runtime.llama.devices import no_device_note
    from huatuo_local.runtime.rpc.client import parse_endpoints

    report = gather(rpc_endpoints=parse_endpoints(rpc) if rpc else None, rpc_key_file=rpc_key_file)
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=2))
    else:
        probe = report.probe
        status = "ok" if probe.get("ok") else "FAILED"
        lines = [
            f"huatuo-local     {report.version}",
            f"engine           llama-cpp-python {report.engine_version}, backends {', '.join(report.backends or [])}"
            + (f" (CMAKE_ARGS={report.engine_build.get('cmake_args') or 'default'})" if report.engine_build else ""),
            f"vision probe     {status}: {probe.get('verdict')} (max |diff| {probe.get('max_abs_diff', 0):.2e} "
            f"on a scale of {probe.get('scale', 0):.2f})" + (f"; {probe['detail']}" if probe.get("detail") else ""),
            f"library          {probe.get('library')}",
            *([f"GPU              {g['name']}: {g['description']}, {g['free_gib']:.1f} GiB free of "
               f"{g['total_gib']:.1f} GiB" for g in report.gpus]
              or [f"GPU              {no_device_note(report.idle_backends or []) or 'none (the CPU runs the model)'}"]),
            *[f"{ref:<16} {note}" for ref, note in (report.placements or {}).items()],
            f"RPC backend      {'built in (huatuo-local rpc-worker, --rpc)' if report.rpc else 'not built'}",
            f"CPU features     {report.system_info}",
            f"CPU cores        {report.physical_cores} physical, {report.logical_cores} logical (threads default to "
            "the physical count)",
            f"RAM              {report.ram_total_gib:.1f} GiB total, {report.ram_available_gib:.1f} GiB available",
            _store_line(report.store or {}),
            *_leftover_lines(report.store or {}),
        ]
        lines += _memory_lines(report)
        rec = report.recommended
        lines.append(f"recommended      -ngl {rec['n_gpu_layers']} --threads {rec['threads']}, quant "
                     + ", ".join(f"{k}: {v or 'too large'}" for k, v in rec["quant"].items()))
        typer.echo("\n".join(lines))
    if not report.probe.get("ok"):
        from huatuo_local.runtime.engine.probe import FIX_HINT

        typer.echo(f"error: the vision probe failed; {FIX_HINT}", err=True)
        raise typer.Exit(1)
