"""What a HuatuoGPT-Vision checkpoint is: config.json → a typed spec, or a clear refusal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedModelError
from .jsonfile import read_json

# architectures / model_type → llama.cpp LLM architecture.
ARCHITECTURES = {"LlavaQwen2ForCausalLM": "qwen2", "LlavaLlamaForCausalLM": "llama"}
MODEL_TYPES = {"llava_qwen2": "qwen2", "llava_llama": "llama", "llava": "llama"}
SUPPORTED_PROJECTORS = ("mlp2x_gelu",)
SUPPORTED_TEXT = (
    "LlavaQwen2ForCausalLM (llava_qwen2, HuatuoGPT-Vision-7B) and "
    "LlavaLlamaForCausalLM (llava_llama, HuatuoGPT-Vision-34B)"
)


@dataclass(frozen=True)
class LLMSpec:
    arch: str  # llama.cpp architecture: "qwen2" or "llama"
    hidden_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    ffn_size: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    context_length: int
    head_dim: int
    tie_embeddings: bool

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "qwen2"


@dataclass(frozen=True)
class ModelSpec:
    """Everything config.json says about a LLaVA-style checkpoint."""

    config_path: Path
    model_type: str
    llm: LLMSpec
    mm_hidden_size: int
    projector_type: str
    select_layer: int  # as in config: -2 means hidden_states[-2]
    vision_tower: str | None  # mm_vision_tower: a repo id, a path, or None
    raw: dict[str, Any]

    def selected_layers(self, tower_layers: int) -> int:
        """How many CLIP blocks feed the projector (hidden_states has tower_layers + 1 entries)."""
        n = self.select_layer if self.select_layer >= 0 else tower_layers + 1 + self.select_layer
        if not 1 <= n <= tower_layers:
            raise UnsupportedModelError(
                f"{self.config_path}: mm_vision_select_layer {self.select_layer} is out of range "
                f"for a {tower_layers}-layer tower"
            )
        return n


def _get(cfg: dict[str, Any], path: Path, key: str, default: Any = ..., kind: type = int) -> Any:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise CheckpointError(f"{path}: missing field '{key}'; is this a complete HuatuoGPT-Vision config.json?")
        return default
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"{path}: field '{key}' should be {kind.__name__}, got {value!r}")
    return value


def _size(cfg: dict[str, Any], path: Path, key: str, default: Any = ...) -> int:
    """A shape field: an integer in a range real models use (a hostile 0 or 10**12 stops here)."""
    value = _get(cfg, path, key, default)
    if not 1 <= value <= MAX_DIM:
        raise CheckpointError(f"{path}: field '{key}' is {value}, outside 1..{MAX_DIM}; the config is damaged")
    return value


MAX_DIM = 1 << 24


def detect_arch(cfg: dict[str, Any], path: Path) -> str:
    archs = cfg.get("architectures")
    for arch in archs if isinstance(archs, list) else []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if cfg.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[cfg["model_type"]]
    named = ", ".join(str(a) for a in archs) if isinstance(archs, list) and archs else None
    named = named or str(cfg.get("model_type") or "nothing")
    raise UnsupportedModelError(f"{path}: unsupported model ({named}); huatuo-local converts {SUPPORTED_TEXT}")


def load_config(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; point to a HuatuoGPT-Vision checkpoint folder")
    return read_json(path, "download config.json again", expect=dict)


def _check_positive(path: Path, **values: float) -> None:
    """Settings llama.cpp takes as they are: zero, negative or NaN gives NaN logits at the first token."""
    import math

    for name, value in values.items():
        if not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"{path}: {name} is {value!r}; it must be a positive number (the config is "
                                  "damaged)")


def read_spec(checkpoint: Path) -> ModelSpec:
    """Parse and validate a checkpoint's config.json."""
    path = Path(checkpoint) / "config.json"
    cfg = load_config(path)
    arch = detect_arch(cfg, path)

    rope = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling")
    if not isinstance(rope, dict) or (rope_scaling is not None and not isinstance(rope_scaling, dict)):
        raise CheckpointError(f"{path}: rope_parameters / rope_scaling must be objects; the config is damaged")
    if rope_scaling and (rope_scaling.get("rope_type") or rope_scaling.get("type")) not in (None, "default"):
        raise UnsupportedModelError(f"{path}: rope_scaling {rope_scaling} is not supported")
    theta = rope.get("rope_theta")
    if theta is not None and (not isinstance(theta, (int, float)) or isinstance(theta, bool)):
        raise CheckpointError(f"{path}: rope_theta should be a number, got {theta!r}")
    n_head = _size(cfg, path, "num_attention_heads")
    hidden = _size(cfg, path, "hidden_size")
    llm = LLMSpec(
        arch=arch,
        hidden_size=hidden,
        n_layer=_size(cfg, path, "num_hidden_layers"),
        n_head=n_head,
        n_kv_head=_size(cfg, path, "num_key_value_heads", n_head),
        ffn_size=_size(cfg, path, "intermediate_size"),
        vocab_size=_size(cfg, path, "vocab_size"),
        rope_theta=float(theta or _get(cfg, path, "rope_theta", 10000.0, float)),
        rms_eps=_get(cfg, path, "rms_norm_eps", 1e-6, float),
        context_length=_size(cfg, path, "max_position_embeddings", 4096),
        head_dim=_size(cfg, path, "head_dim", max(1, hidden // n_head)),
        tie_embeddings=_get(cfg, path, "tie_word_embeddings", False, bool),
    )
    _check_positive(path, rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_eps)
    if hidden % n_head or llm.n_head % llm.n_kv_head:
        raise CheckpointError(f"{path}: inconsistent attention heads ({hidden=}, {n_head=}, kv={llm.n_kv_head})")

    projector = _get(cfg, path, "mm_projector_type", "linear", str)
    if projector not in SUPPORTED_PROJECTORS:
        raise UnsupportedModelError(
            f"{path}: mm_projector_type '{projector}' is not supported; huatuo-local converts 'mlp2x_gelu' "
            "projectors (HuatuoGPT-Vision, LLaVA-1.5)"
        )
    feature = _get(cfg, path, "mm_vision_select_feature", "patch", str)
    if feature != "patch":
        raise UnsupportedModelError(f"{path}: mm_vision_select_feature '{feature}' is not supported (only 'patch')")
    aspect = _get(cfg, path, "image_aspect_ratio", "pad", str)
    if aspect != "pad":
        raise UnsupportedModelError(f"{path}: image_aspect_ratio '{aspect}' is not supported (only 'pad')")
    merge = _get(cfg, path, "mm_patch_merge_type", "flat", str)
    if merge != "flat":
        raise UnsupportedModelError(f"{path}: mm_patch_merge_type '{merge}' is not supported (only 'flat')")
    tower = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    return ModelSpec(
        config_path=path,
        model_type=str(cfg.get("model_type", "")),
        llm=llm,
        mm_hidden_size=_size(cfg, path, "mm_hidden_size"),
        projector_type=projector,
        select_layer=_get(cfg, path, "mm_vision_select_layer", -2),
        vision_tower=tower if isinstance(tower, str) else None,
        raw=cfg,
    )
