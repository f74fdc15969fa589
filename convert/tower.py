"""Find the CLIP vision tower of a checkpoint, wherever the release put it.

The release's layouts (docs/RELEASE.md): (a) inside the checkpoint under `model.vision_tower.vision_tower.*`;
(b) a CLIPVisionModel folder named by `mm_vision_tower`, absolute or relative to the
checkpoint; (c) given by the user with --vision-tower. A repo id is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huatuo_local.models.errors import CheckpointError, HuatuoError
from huatuo_local.models.jsonfile import read_json
from huatuo_local.models.layout import ModelSpec
from huatuo_local.models.towers import VisionSpec, known_tower, spec_from_config, with_preprocessor

from . import hub
from .checkpoint import TensorSource, open_tensors
from .names import FOLDER_TOWER_PREFIXES, TOWER_PREFIXES

_FOLDER_SKIP = ("text_model.", "logit_scale", "visual_projection.", "text_projection.")


@dataclass
class Tower:
    tensors: dict[str, TensorSource]  # names relative to `vision_model.`
    spec: VisionSpec
    where: str  # for messages and the manifest


def _strip(tensors: dict[str, TensorSource], prefixes: tuple[str, ...]) -> dict[str, TensorSource]:
    out: dict[str, TensorSource] = {}
    for name, ref in tensors.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                out[name[len(prefix):]] = ref
                break
    return out


def _folder_spec(folder: Path) -> VisionSpec | None:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = read_json(cfg_path, "download the vision tower again", expect=dict)
    return with_preprocessor(spec_from_config(cfg, cfg_path), folder)


def _from_folder(folder: Path, label: str) -> Tower:
    spec = _folder_spec(folder)
    if spec is None:
        known = known_tower(label)
        if known is None:
            raise CheckpointError(f"{folder}: vision tower folder has no config.json; download the tower again")
        spec = known
    raw = {n: r for n, r in open_tensors(folder).items() if not n.startswith(_FOLDER_SKIP)}
    tensors = _strip(raw, FOLDER_TOWER_PREFIXES)
    return Tower(tensors, spec, str(folder))


def _resolve_named(name: str, checkpoint: Path, config_path: Path) -> Path | None:
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        return candidate if candidate.is_dir() else None
    relative = checkpoint / name
    if relative.is_dir():
        return relative
    return None


def locate_tower(checkpoint: Path, spec: ModelSpec, tensors: dict[str, TensorSource],
                 override: str | None = None) -> Tower:
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            return _from_folder(path, override)
        if hub.looks_like_repo(override):
            return _from_folder(hub.download_tower(override), override)
        raise HuatuoError(f"{override}: --vision-tower is neither a folder nor a Hugging Face repo id")

    inside = _strip({n: r for n, r in tensors.items() if n.startswith("model.vision_tower.")}, TOWER_PREFIXES)
    named = spec.vision_tower
    folder = _resolve_named(named, checkpoint, spec.config_path) if named else None
    if inside:
        vspec = _folder_spec(folder) if folder else None
        if vspec is None and isinstance(spec.raw.get("vision_config"), dict):
            vspec = spec_from_config(spec.raw["vision_config"], spec.config_path)
        if vspec is None:
            vspec = known_tower(named)
        if vspec is None:
            raise CheckpointError(
                f"{spec.config_path}: the vision tower's weights are inside the checkpoint but its configuration "
                f"is unknown (mm_vision_tower={named!r}); give the tower folder with --vision-tower"
            )
        return Tower(inside, vspec, "inside the checkpoint")
    if folder is not None:
        return _from_folder(folder, named or "")
    if named and hub.looks_like_repo(named) and not Path(named).is_absolute():
        try:
            return _from_folder(hub.download_tower(named), named)
        except HuatuoError as exc:
            raise HuatuoError(
                f"{spec.config_path}: vision tower '{named}' is not in the checkpoint nor at {checkpoint / named}, "
                f"and downloading it failed ({exc}); give it with --vision-tower PATH_OR_REPO"
            ) from exc
    raise HuatuoError(
        f"{spec.config_path}: vision tower {named!r} not found (not inside the checkpoint, not at "
        f"{checkpoint / (named or '')}); give it with --vision-tower PATH_OR_REPO"
    )
