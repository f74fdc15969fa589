"""The local model store: where converted models live, and how a name or path becomes a GGUF pair.

Layout: $HUATUO_LOCAL_HOME/models/NAME/{NAME-QUANT.gguf, mmproj-NAME-TYPE.gguf,
NAME-QUANT.manifest.json}. HUATUO_LOCAL_HOME defaults to the user cache folder.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import HuatuoError
from .manifest import MANIFEST_SUFFIX, Manifest
from .registry import DEFAULT_MODEL, KNOWN_MODELS


class ModelNotFound(HuatuoError):
    pass


def home() -> Path:
    env = os.environ.get("HUATUO_LOCAL_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "huatuo-local"


def models_dir() -> Path:
    return home() / "models"


@dataclass
class ResolvedModel:
    name: str
    llm_path: Path
    mmproj_path: Path
    manifest: Manifest | None
    folder: Path

    @property
    def eos_id(self) -> int | None:
        return self.manifest.eos_id if self.manifest else None


def _from_manifest(path: Path) -> ResolvedModel:
    m = Manifest.read(path)
    folder = path.parent
    llm, mmproj = folder / m.llm_file, folder / m.mmproj_file
    for p in (llm, mmproj):
        if not p.is_file():
            raise ModelNotFound(f"{p}: listed in {path.name} but missing; convert or pull the model again")
    return ResolvedModel(m.name, llm, mmproj, m, folder)


def _from_folder(folder: Path) -> ResolvedModel:
    manifests = sorted(folder.glob(f"*{MANIFEST_SUFFIX}"))
    if len(manifests) == 1:
        return _from_manifest(manifests[0])
    if len(manifests) > 1:
        names = ", ".join(m.name for m in manifests)
        raise ModelNotFound(f"{folder}: holds several models ({names}); pass one manifest or .gguf file")
    raise ModelNotFound(f"{folder}: no model manifest here; convert a checkpoint into it with `huatuo-local convert`")


def _from_gguf(path: Path) -> ResolvedModel:
    manifest = path.with_name(path.name[: -len(".gguf")] + MANIFEST_SUFFIX)
    if manifest.is_file():
        return _from_manifest(manifest)
    projectors = sorted(p for p in path.parent.glob("mmproj-*.gguf"))
    if len(projectors) != 1:
        raise ModelNotFound(
            f"{path}: cannot tell which vision projector belongs to it ({len(projectors)} mmproj-*.gguf beside it); "
            "keep the manifest `huatuo-local convert` wrote next to the files"
        )
    return ResolvedModel(path.stem, path, projectors[0], None, path.parent)


def resolve(model: str | Path | None) -> ResolvedModel:
    """A model name in the store, a folder, a manifest or an LLM .gguf → the pair to load."""
    if model is None or str(model) == "":
        model = DEFAULT_MODEL
    text = str(model)
    path = Path(text).expanduser()
    if path.is_file():
        if text.endswith(MANIFEST_SUFFIX):
            return _from_manifest(path)
        if text.endswith(".gguf"):
            return _from_gguf(path)
        raise ModelNotFound(f"{path}: not a model (.gguf or {MANIFEST_SUFFIX})")
    if path.is_dir():
        return _from_folder(path)
    stored = models_dir() / text
    if stored.is_dir():
        return _from_folder(stored)
    if text in KNOWN_MODELS:
        raise ModelNotFound(f"model {text} is not installed; get it with: huatuo-local pull {text}")
    if "/" in text or text.endswith(".gguf"):
        raise ModelNotFound(f"{text}: no such file or folder")
    raise ModelNotFound(f"model {text} is not installed (see `huatuo-local list`); known: {', '.join(KNOWN_MODELS)}")


def list_models() -> list[ResolvedModel]:
    out = []
    root = models_dir()
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for manifest in sorted(folder.glob(f"*{MANIFEST_SUFFIX}")):
            try:
                out.append(_from_manifest(manifest))
            except HuatuoError:
                continue
    return out


def remove(name: str) -> Path:
    folder = models_dir() / name
    if not folder.is_dir() or name in ("", ".", ".."):
        raise ModelNotFound(f"model {name} is not installed (see `huatuo-local list`)")
    shutil.rmtree(folder)
    return folder
