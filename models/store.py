"""The local model store: where converted models live, and how a name or path becomes a GGUF pair.

Layout: $HUATUO_LOCAL_HOME/models/NAME/{NAME-QUANT.gguf, mmproj-NAME-TYPE.gguf,
NAME-QUANT.manifest.json, NAME.imatrix.gguf}, one manifest per quant, the mmproj (and the importance
matrix low-bit quants were made with) shared between them.
Models are named as Ollama users expect: `NAME:QUANT` (`huatuo-vision-7b:q8_0`), and a bare
`NAME` is the only quant in the folder or, among several, the model's default.
HUATUO_LOCAL_HOME defaults to the user cache folder.

Deletion only ever removes files that a manifest in the store lists, resolved inside the
store, never through a symlink: `rm` cannot be pointed at anything that is not ours.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import HuatuoError
from .manifest import MANIFEST_SUFFIX, Manifest
from .registry import DEFAULT_MODEL, KNOWN_MODELS

# A store name: what `pull --name` and the store's folders use. No separators, no `..`.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_QUANT = re.compile(r"^[A-Za-z0-9_]{1,32}$")


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
    store_name: str | None = None  # the folder's name when the model is in the store
    manifest_path: Path | None = None

    @property
    def eos_id(self) -> int | None:
        return self.manifest.eos_id if self.manifest else None

    @property
    def quant(self) -> str:
        return self.manifest.quant if self.manifest else ""

    @property
    def ref(self) -> str:
        """`NAME:quant` for a stored model, else the model's name."""
        if self.store_name and self.quant:
            return f"{self.store_name}:{self.quant.lower()}"
        return self.store_name or self.name

    @property
    def size_bytes(self) -> int:
        return self.llm_path.stat().st_size + self.mmproj_path.stat().st_size


def is_valid_name(name: str) -> bool:
    return bool(_NAME.match(name)) and ".." not in name


def parse_ref(text: str) -> tuple[str, str | None]:
    """`NAME` or `NAME:QUANT` → (name, quant or None), refusing anything that is not a store name."""
    name, sep, quant = text.partition(":")
    if not is_valid_name(name) or (sep and not _QUANT.match(quant)):
        raise ModelNotFound(
            f"{text}: not a model name in the store (names are letters, digits, '.', '_' and '-', optionally "
            ":QUANT; see `huatuo-local list`)"
        )
    return name, (quant.upper() if sep else None)


def store_folder(name: str) -> Path:
    """The store folder of `name`, refused if it is a symlink or resolves outside the store."""
    if not is_valid_name(name):
        raise ModelNotFound(f"{name}: not a model name in the store (see `huatuo-local list`)")
    root = models_dir()
    folder = root / name
    if folder.is_symlink():
        raise ModelNotFound(f"{folder}: is a symlink; the store holds only its own folders (remove the link by hand)")
    if folder.exists() and folder.resolve().parent != root.resolve():
        raise ModelNotFound(f"{folder}: resolves outside {root}; refusing to use it")
    return folder


def _from_manifest(path: Path, store_name: str | None = None) -> ResolvedModel:
    m = Manifest.read(path)
    folder = path.parent
    llm, mmproj = folder / m.llm_file, folder / m.mmproj_file
    for p in (llm, mmproj):
        if not p.is_file():
            raise ModelNotFound(f"{p}: listed in {path.name} but missing; convert or pull the model again")
    return ResolvedModel(m.name, llm, mmproj, m, folder, store_name, path)


def _manifests(folder: Path) -> list[Path]:
    # Only regular files: a symlinked manifest could name files in another folder's context.
    return sorted(p for p in folder.glob(f"*{MANIFEST_SUFFIX}") if p.is_file() and not p.is_symlink())


def _from_folder(folder: Path, quant: str | None = None, store_name: str | None = None) -> ResolvedModel:
    found = [_from_manifest(m, store_name) for m in _manifests(folder)]
    label = store_name or str(folder)
    if quant is not None:
        for r in found:
            if r.quant.upper() == quant:
                return r
        have = ", ".join(r.ref if store_name else r.quant.lower() for r in found) or "none"
        hint = (f"; get it with: huatuo-local pull {label} --quant {quant}" if label in KNOWN_MODELS
                else "; convert the checkpoint again with --quant")
        raise ModelNotFound(f"{label}:{quant.lower()} is not installed (installed: {have}){hint}")
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        known = KNOWN_MODELS.get(store_name or "")
        if known:
            for r in found:
                if r.quant.upper() == known.default_quant:
                    return r
        refs = ", ".join(r.ref if store_name else r.llm_path.name for r in found)
        raise ModelNotFound(f"{label}: holds several models ({refs}); name one "
                            + ("as NAME:QUANT" if store_name else "manifest or .gguf file"))
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
    """A store name (`NAME` or `NAME:QUANT`), a folder, a manifest or an LLM .gguf → the pair to load."""
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
    if "/" in text or os.sep in text or text.endswith(".gguf"):
        raise ModelNotFound(f"{text}: no such file or folder")
    name, quant = parse_ref(text)
    folder = store_folder(name)
    if folder.is_dir() and _manifests(folder):
        return _from_folder(folder, quant, store_name=name)
    if name in KNOWN_MODELS:
        extra = f" --quant {quant}" if quant else ""
        raise ModelNotFound(f"model {text} is not installed; get it with: huatuo-local pull {name}{extra}")
    installed = sorted({m.store_name or m.name for m in list_models()})
    close = difflib.get_close_matches(name, installed, n=3, cutoff=0.6)
    if close:
        raise ModelNotFound(f"model {text} is not installed; did you mean {' or '.join(close)}? "
                            "(`huatuo-local list` shows what is)")
    have = f"installed: {', '.join(installed)}" if installed else "nothing is installed yet"
    raise ModelNotFound(f"model {text} is not installed ({have}); get one with `huatuo-local pull NAME` or "
                        "`huatuo-local convert CHECKPOINT --name NAME`")


def list_models() -> list[ResolvedModel]:
    """Every usable model in the store, one per manifest (so one per quant)."""
    out: list[ResolvedModel] = []
    root = models_dir()
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        if folder.is_symlink() or not folder.is_dir() or not is_valid_name(folder.name):
            continue
        for manifest in _manifests(folder):
            try:
                out.append(_from_manifest(manifest, folder.name))
            except HuatuoError:
                continue
    return out


@dataclass
class Removal:
    refs: list[str]
    deleted: list[Path]
    kept: list[Path]  # files another manifest still uses (the shared mmproj)
    bytes_freed: int


def _files_of(m: ResolvedModel) -> list[Path]:
    """The files a stored model's manifest lists: itself, the pair, and its importance matrix if any."""
    assert m.manifest_path is not None and m.manifest is not None
    files = [m.manifest_path, m.llm_path, m.mmproj_path]
    if m.manifest.imatrix_file:
        files.append(m.folder / m.manifest.imatrix_file)
    return files


def plan_removal(ref: str, all_quants: bool = False) -> tuple[list[ResolvedModel], list[Path], list[Path]]:
    """What `rm REF` would delete: (models, files to delete, shared files kept). Deletes nothing."""
    if "/" in ref or os.sep in ref or ref.startswith("."):
        raise ModelNotFound(f"{ref}: rm takes a model name from `huatuo-local list`, not a path")
    name, quant = parse_ref(ref)
    folder = store_folder(name)
    installed = [m for m in list_models() if m.store_name == name]
    if not folder.is_dir() or not installed:
        raise ModelNotFound(f"model {ref} is not installed (see `huatuo-local list`)")
    if quant is not None:
        targets = [m for m in installed if m.quant.upper() == quant]
        if not targets:
            have = ", ".join(m.ref for m in installed)
            raise ModelNotFound(f"model {ref} is not installed (installed: {have})")
    elif all_quants or len(installed) == 1:
        targets = installed
    else:
        have = ", ".join(m.ref for m in installed)
        raise ModelNotFound(f"{name}: holds several quants ({have}); rm one as NAME:QUANT, or all with --all")
    remaining = [m for m in installed if m not in targets]
    still_used = {p.name for m in remaining for p in _files_of(m)}
    delete: list[Path] = []
    kept: list[Path] = []
    for m in targets:
        for p in _files_of(m):
            if p.name in still_used:
                if p not in kept:
                    kept.append(p)
            elif p not in delete:
                delete.append(p)
    return targets, delete, kept


def remove(ref: str, all_quants: bool = False) -> Removal:
    """Delete one stored model (or every quant of a name); never a file outside its store folder."""
    targets, delete, kept = plan_removal(ref, all_quants)
    freed = 0
    folder = store_folder(parse_ref(ref)[0])
    root = folder.resolve()
    for p in delete:
        # Every path is a plain name inside the store folder (manifests are validated); unlink
        # removes a symlink itself, never what it points to.
        if p.parent.resolve() != root:
            raise ModelNotFound(f"{p}: outside {folder}; refusing to delete it")
        try:
            if not p.is_symlink():
                freed += p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            pass
    try:
        folder.rmdir()  # only when nothing else is left in it
    except OSError:
        pass
    return Removal([m.ref for m in targets], delete, kept, freed)
