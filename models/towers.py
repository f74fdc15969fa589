"""CLIP vision towers: their hyperparameters and image preprocessing constants."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedModelError
from .jsonfile import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int
    n_layer: int
    n_head: int
    ffn_size: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    source: str = field(default="", compare=False)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# Towers whose configuration is known without their files (the release names them by repo id).
KNOWN_TOWERS: dict[str, VisionSpec] = {
    "openai/clip-vit-large-patch14-336": VisionSpec(1024, 24, 16, 4096, 336, 14, source="built-in"),
    "openai/clip-vit-large-patch14": VisionSpec(1024, 24, 16, 4096, 224, 14, source="built-in"),
}


def known_tower(name: str | None) -> VisionSpec | None:
    if not name:
        return None
    key = name.strip().rstrip("/")
    if key in KNOWN_TOWERS:
        return KNOWN_TOWERS[key]
    # Local copies keep the repo's last path component, e.g. ./vit/clip-vit-large-patch14-336
    tail = key.replace("_", "-").split("/")[-1]
    for repo, spec in KNOWN_TOWERS.items():
        if repo.split("/")[-1] == tail:
            return spec
    return None


def spec_from_config(cfg: dict[str, Any], where: Path | str) -> VisionSpec:
    """A VisionSpec from a CLIPVisionConfig or a CLIPConfig (with `vision_config`)."""
    vc = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else cfg
    try:
        act = vc.get("hidden_act", "quick_gelu")
        if act not in ("quick_gelu", "gelu"):
            raise UnsupportedModelError(f"{where}: vision tower activation '{act}' is not supported")
        return VisionSpec(
            hidden_size=int(vc["hidden_size"]),
            n_layer=int(vc["num_hidden_layers"]),
            n_head=int(vc["num_attention_heads"]),
            ffn_size=int(vc["intermediate_size"]),
            image_size=int(vc.get("image_size", 336)),
            patch_size=int(vc.get("patch_size", 14)),
            layer_norm_eps=float(vc.get("layer_norm_eps", 1e-5)),
            activation=act,
            source=str(where),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{where}: incomplete vision tower config ({exc}); check the tower's config.json") from exc


def with_preprocessor(spec: VisionSpec, folder: Path | None) -> VisionSpec:
    """Apply a tower folder's preprocessor_config.json (mean, std, crop size) when present."""
    if folder is None:
        return spec
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return spec
    pp = read_json(path, expect=dict)
    mean = tuple(float(x) for x in pp.get("image_mean", spec.image_mean))
    std = tuple(float(x) for x in pp.get("image_std", spec.image_std))
    crop = pp.get("crop_size", spec.image_size)
    if isinstance(crop, dict):
        crop = crop.get("height", spec.image_size)
    if int(crop) != spec.image_size:
        raise UnsupportedModelError(
            f"{path}: crop size {crop} differs from the tower's image size {spec.image_size}"
        )
    return replace(spec, image_mean=mean, image_std=std)  # type: ignore[arg-type]
