"""The local model store: where converted models live, and how a name or path becomes a GGUF pair.

Layout: $HUATUO_LOCAL_HOME/models/NAME/{NAME-QUANT.gguf, mmproj-NAME-TYPE.gguf,
NAME-QUANT.manifest.json, NAME.imatrix.gguf}, one manifest per quant, the mmproj (and the importance
matrix low-bit quants were made with) shared between them.
Models are named as Ollama users expect: `NAME:QUANT` (`huatuo-vision-7b:q8_0`), and a bare
`NAME` is the only quant in the folder or, among several, the best installed quant that fits this
machine's free memory (models/sizing.py `installed_choice`, the rule doctor and pull recommend by).
HUATUO_LOCAL_HOME defaults to the user cache folder.

Deletion only ever removes files that a manifest in the store lists, resolved inside the
store, never through a symlink: `rm` cannot be pointed at anything that is not ours.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import HuatuoError
from .manifest import MANIFEST_SUFFIX, Manifest
from .registry import DEFAULT_MODEL, KNOWN_MODELS
from .sizing import FreeMemory, files_need, installed_choice, memory_needed

# A store name: what `pull --name` and the store's folders use. No separators, no `..`.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_QUANT = re.compile(r"^[A-Za-z0-9_]{1,32}$")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT = re.compile(r"[0-9a-f]{40}")
# The types a conversion keeps losslessly: another quant is made from them without the checkpoint.
LOSSLESS = ("BF16", "F16", "F32")
CHECKPOINT_SUFFIX = ".checkpoint.json"


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


def downloads_dir() -> Path:
    return home() / "downloads"


def snapshot_dir(repo_id: str, revision: str) -> Path:
    """Our download folder for one commit of a repository: always a plain folder two levels inside downloads/."""
    if not REPO_ID.match(repo_id) or ".." in repo_id or not COMMIT.fullmatch(revision):
        raise HuatuoError(f"internal: refusing a download folder for {repo_id!r} at {revision!r}")
    return downloads_dir() / repo_id.replace("/", "--") / revision


def remove_snapshot(repo_id: str, revision: str) -> None:
    """Delete our download folder of one commit, and the repository's folder once it holds nothing else.

    Only a real folder whose resolved path is inside downloads/ is removed; a link there is only unlinked.
    """
    folder = snapshot_dir(repo_id, revision)
    if folder.is_symlink():
        folder.unlink()
    else:
        root = downloads_dir().resolve()
        if folder.is_dir() and root in folder.resolve().parents:
            shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # only when empty: another commit's download stays
    except OSError:
        pass


@dataclass(frozen=True)
class KeptCheckpoint:
    """A downloaded checkpoint kept (`pull --keep checkpoint`) so that another quant needs no download.

    Recorded as NAME.checkpoint.json in the model's store folder; the files stay in our download folder of
    that commit (snapshot_dir), which is all `rm` ever deletes for it."""

    repo_id: str
    revision: str
    bytes: int

    @property
    def folder(self) -> Path:
        return snapshot_dir(self.repo_id, self.revision)

    @staticmethod
    def record(store: Path) -> Path:
        return store / f"{store.name}{CHECKPOINT_SUFFIX}"

    def write(self, store: Path) -> None:
        from .private import write_private

        write_private(self.record(store), json.dumps(asdict(self)))

    @classmethod
    def read(cls, store: Path) -> KeptCheckpoint | None:
        """The record in `store`, or None when there is none or it is not one of ours (then it is ignored)."""
        path = cls.record(store)
        if not path.is_file() or path.is_symlink():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8")[:4096])
            kept = cls(str(data["repo_id"]), str(data["revision"]), int(data["bytes"]))
            kept.folder  # noqa: B018 (validates the repository id and commit)
        except (OSError, ValueError, KeyError, TypeError, HuatuoError):
            return None
        return kept if kept.folder.is_dir() else None


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
        """`NAME:quant` (the store's name, else the converted model's), or the file's name without a manifest:
        what every answer says it came from."""
        name = self.store_name or self.name
        return f"{name}:{self.quant.lower()}" if self.quant else name

    def need(self, gpu: bool = False) -> int:
        """Bytes a run of this model holds at the default context (models/sizing.py)."""
        known = KNOWN_MODELS.get(self.store_name or "")
        if known is not None and self.quant.upper() in known.llm_bytes:
            return memory_needed(known, self.quant.upper(), gpu=gpu).total
        return files_need(self.llm_path, self.mmproj_path, gpu).total

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


def _from_folder(folder: Path, quant: str | None = None, store_name: str | None = None,
                 free: FreeMemory | None = None) -> ResolvedModel:
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
        by_quant = {r.quant.upper(): r for r in found}
        if len(by_quant) != len(found) or "" in by_quant:  # not quants of one model: the user must say which
            refs = ", ".join(r.llm_path.name for r in found)
            raise ModelNotFound(f"{label}: holds several models ({refs}); name one manifest or .gguf file")
        return by_quant[installed_choice(list(by_quant), lambda q, gpu: by_quant[q].need(gpu), free)]
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


def resolve(model: str | Path | None, free: FreeMemory | None = None) -> ResolvedModel:
    """A store name (`NAME` or `NAME:QUANT`), a folder, a manifest or an LLM .gguf → the pair to load.

    A name or folder holding several quants means the best that fits `free` (this machine's free memory;
    None: the best installed)."""
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
        return _from_folder(path, free=free)
    if path.exists():  # a FIFO, socket or device: reading it would block or never end
        raise ModelNotFound(f"{path}: not a regular file; a model is a .gguf file")
    if "/" in text or os.sep in text or text.endswith(".gguf"):
        raise ModelNotFound(f"{text}: no such file or folder")
    name, quant = parse_ref(text)
    folder = store_folder(name)
    if folder.is_dir() and _manifests(folder):
        return _from_folder(folder, quant, store_name=name, free=free)
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


def plan_removal(ref: str, all_quants: bool = False
                 ) -> tuple[list[ResolvedModel], list[Path], list[Path], KeptCheckpoint | None]:
    """What `rm REF` would delete: (models, files to delete, shared files kept, the kept checkpoint whose
    download goes too). `NAME:checkpoint` is the checkpoint `pull --keep checkpoint` kept. Deletes nothing."""
    if "/" in ref or os.sep in ref or ref.startswith("."):
        raise ModelNotFound(f"{ref}: rm takes a model name from `huatuo-local list`, not a path")
    name, quant = parse_ref(ref)
    folder = store_folder(name)
    installed = [m for m in list_models() if m.store_name == name]
    kept = KeptCheckpoint.read(folder) if folder.is_dir() else None
    if quant == "CHECKPOINT":
        if kept is None:
            raise ModelNotFound(f"{ref}: no checkpoint is kept for {name} (see `huatuo-local list`)")
        return [], [KeptCheckpoint.record(folder)], [], kept
    if not folder.is_dir() or not installed:
        if kept is not None and (all_quants or quant is None):
            return [], [KeptCheckpoint.record(folder)], [], kept
        raise ModelNotFound(f"model {ref} is not installed (see `huatuo-local list`)")
    if quant is not None:
        targets = [m for m in installed if m.quant.upper() == quant]
        if not targets:
            have = ", ".join(m.ref for m in installed)
            raise ModelNotFound(f"model {ref} is not installed (installed: {have})")
    elif all_quants or (len(installed) == 1 and kept is None):
        targets = installed
    else:
        have = ", ".join([m.ref for m in installed] + ([f"{name}:checkpoint"] if kept else []))
        raise ModelNotFound(f"{name}: holds several ({have}); rm one as NAME:QUANT, or all with --all")
    remaining = [m for m in installed if m not in targets]
    still_used = {p.name for m in remaining for p in _files_of(m)}
    delete: list[Path] = []
    shared: list[Path] = []
    for m in targets:
        for p in _files_of(m):
            if p.name in still_used:
                if p not in shared:
                    shared.append(p)
            elif p not in delete:
                delete.append(p)
    if all_quants and kept is not None:
        delete.append(KeptCheckpoint.record(folder))
        return targets, delete, shared, kept
    return targets, delete, shared, None


def remove(ref: str, all_quants: bool = False) -> Removal:
    """Delete one stored model (or every quant of a name, or its kept checkpoint); never a file outside its
    store folder or our own download folder."""
    targets, delete, kept, checkpoint = plan_removal(ref, all_quants)
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
    refs = [m.ref for m in targets]
    if checkpoint is not None:
        freed += checkpoint.bytes
        remove_snapshot(checkpoint.repo_id, checkpoint.revision)
        refs.append(f"{folder.name}:checkpoint")
    try:
        folder.rmdir()  # only when nothing else is left in it
    except OSError:
        pass
    return Removal(refs, delete, kept, freed)


@dataclass
class StoreUsage:
    """What huatuo-local keeps under its home folder, for `doctor`."""

    home: Path
    models: int
    model_bytes: int
    download_bytes: int
    free_bytes: int  # on the disk that holds the home folder


def _tree_bytes(root: Path) -> int:
    total = 0
    if root.is_dir() and not root.is_symlink():
        for dirpath, _dirs, files in os.walk(root):  # never follows links
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except OSError:
                    pass
    return total


def store_usage() -> StoreUsage:
    found = list_models()
    root = home()
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return StoreUsage(root, len(found), _tree_bytes(models_dir()), _tree_bytes(downloads_dir()),
                      shutil.disk_usage(probe).free)


# --- one writer per folder, and what a killed one left ------------------------------------

LOCK_NAME = ".huatuo-convert.lock"
STAGED_SUFFIXES = (".staging", ".intermediate.gguf", ".partial")  # our temporary names (all start with ".")


@contextmanager
def writing_into(folder: Path) -> Iterator[None]:
    """Hold `folder` for one convert: a second convert into it at the same time is refused in one line
    (staged files have fixed names), and its leftovers are never taken for a dead run's."""
    import fcntl

    lock_path = folder / LOCK_NAME
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as exc:
            raise HuatuoError(f"{folder}: cannot write here ({exc.strerror}); choose another output folder with -o")\
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HuatuoError(f"{folder}: another convert or pull is writing into this folder; wait for it to "
                              "finish, or choose another --name or -o") from None
        try:  # the lock file we hold must still be the one at that path (its last holder unlinks it)
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def _busy(folder: Path) -> bool:
    """A convert is writing into `folder` now."""
    import fcntl

    lock_path = folder / LOCK_NAME
    if not lock_path.is_file() or lock_path.is_symlink():
        return False
    fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def leftovers() -> list[Path]:
    """Files a convert or pull that was killed (SIGKILL, a power cut) left in the store: our temporary names
    in store folders no convert is writing into now. Partial downloads are not among them: they resume."""
    root = models_dir()
    found: list[Path] = []
    if not root.is_dir():
        return found
    for folder in sorted(root.iterdir()):
        if folder.is_symlink() or not folder.is_dir() or not is_valid_name(folder.name) or _busy(folder):
            continue
        found += [p for p in sorted(folder.iterdir()) if p.name.startswith(".") and p.name.endswith(STAGED_SUFFIXES)
                  and p.is_file() and not p.is_symlink()]
    return found


def remove_leftovers() -> tuple[int, int]:
    """Delete what `leftovers` lists; returns (files, bytes)."""
    count = freed = 0
    for p in leftovers():
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            continue
        count, freed = count + 1, freed + size
    return count, freed
