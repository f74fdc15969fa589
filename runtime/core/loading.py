"""Loading a model the one way every front-end does: resolve the name, place it, load it, open its cache.

`open_model` is used by the Python API (`HuatuoChatbot`), the server and eval alike, so a model behaves
the same whichever front-end loaded it.
"""

from __future__ import annotations

from dataclasses import dataclass

from huatuo_local.models.store import ResolvedModel, resolve
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.core.offline import forbid_network
from huatuo_local.runtime.core.prefix_cache import PrefixCache, file_checksum
from huatuo_local.runtime.core.record import provenance
from huatuo_local.runtime.engine.build import engine_build_id
from huatuo_local.runtime.engine.engine import DEFAULT_CTX, Engine, EngineOptions
from huatuo_local.runtime.engine.placement import plan_placement
from huatuo_local.runtime.trace import mark


def cache_identity(model: ResolvedModel, options: EngineOptions) -> dict[str, str]:
    """Everything that changes what a saved KV state means (see core/prefix_cache.py)."""
    manifest = model.manifest
    return {
        "llm_sha256": manifest.llm_sha256 if manifest and manifest.llm_sha256 else file_checksum(model.llm_path),
        "mmproj_sha256": (manifest.mmproj_sha256 if manifest and manifest.mmproj_sha256
                          else file_checksum(model.mmproj_path)),
        "engine": engine_build_id(), "kv_type": options.kv_type, "n_ctx": str(options.n_ctx),
        "gpu_layers": str(options.n_gpu_layers),
        "rpc": ",".join(options.rpc),
    }


@dataclass
class Loaded:
    """A loaded model: what was resolved, the engine, its prefix cache, and the line said at load (where the
    layers went, or why no GPU took them; '' when there is nothing to say)."""

    model: ResolvedModel
    engine: Engine
    cache: PrefixCache | None
    note: str = ""
    provenance: dict | None = None  # the model side of every answer's record (core/record.py)


def rpc_endpoints(config: ModelConfig) -> tuple[str, ...]:
    from huatuo_local.runtime.rpc.client import parse_endpoints

    return tuple(parse_endpoints(config.rpc)) if config.rpc else ()


def engine_options(config: ModelConfig, n_gpu_layers: int, mmproj_offload: bool) -> EngineOptions:
    """The engine's options for `config`, the placement settled."""
    return EngineOptions(
        n_ctx=config.ctx or 0, n_threads=config.threads, kv_type=config.kv_type, mmproj_offload=mmproj_offload,
        n_gpu_layers=n_gpu_layers, allow_unverified_vision=config.allow_unverified_vision, load=config.load,
        n_seq=max(1, config.parallel), rpc=rpc_endpoints(config),
        tensor_split=config.tensor_split, rpc_key_file=str(config.rpc_key_file) if config.rpc_key_file else None)


def open_model(config: ModelConfig, prefetch: tuple = ()) -> Loaded:
    """Resolve and load a model the one way chat, HuatuoChatbot, serve and eval all use; `prefetch`: pictures
    the first question brings, encoded while the LLM loads (engine/engine.py)."""
    from huatuo_local.runtime.llama.devices import free_memory

    config.check()
    # A name with several quants installed means the best that fits this machine now (models/store.py).
    resolved = resolve(config.model, free_memory())
    mark("model resolved")
    # Where the work goes, decided once (engine/placement.py): the engine applies it, the note says it.
    plan = plan_placement(resolved.llm_path, resolved.mmproj_path, n_gpu_layers=config.n_gpu_layers,
                          mmproj_offload=config.mmproj_offload,
                          n_ctx_total=(config.ctx or DEFAULT_CTX) * max(1, config.parallel), kv_type=config.kv_type,
                          rpc=rpc_endpoints(config), tensor_split=config.tensor_split,
                          rpc_key_file=str(config.rpc_key_file) if config.rpc_key_file else None)
    options = engine_options(config, plan.n_gpu_layers, plan.vision_on_gpu)
    mark("placement planned")
    guard = forbid_network() if config.offline else None
    try:
        engine = Engine(resolved.llm_path, resolved.mmproj_path, options, eos_id=resolved.eos_id, placement=plan,
                        prefetch=prefetch)
    except BaseException:
        if guard is not None:
            guard.release()
        raise
    if guard is not None:  # offline for as long as this model is open
        engine.on_close.append(guard.release)
    identity = cache_identity(resolved, engine.options)
    mark("model identity")
    cache = PrefixCache.default(identity) if config.prefix_cache else None
    prov = provenance(resolved, identity, {"n_ctx": engine.options.n_ctx, "kv_type": engine.options.kv_type,
                                           "n_gpu_layers": engine.options.n_gpu_layers,
                                           "rpc_workers": len(engine.options.rpc)})
    return Loaded(resolved, engine, cache, plan.note, prov)
