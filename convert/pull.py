"""`huatuo-local pull`: fetch a model into the local store, ready to chat.

A known name or a Hugging Face repo holding the original checkpoint is downloaded (only
the needed files, at one pinned commit, resumable), converted and quantized; a repo that
already holds converted GGUF files gives exactly the quant asked for, copied (not linked)
into the store. The commit sha is recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huatuo_local.models import gguf_keys as keys
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.gguf_check import check_gguf
from huatuo_local.models.interrupt import terminate_as_interrupt
from huatuo_local.models.manifest import MANIFEST_SUFFIX, Manifest, sha256_file
from huatuo_local.models.registry import KNOWN_MODELS
from huatuo_local.models.store import (
    LOSSLESS,
    KeptCheckpoint,
    ResolvedModel,
    is_valid_name,
    list_models,
    remove_snapshot,
    resolve,
    store_folder,
    writing_into,
)


def pick_gguf_pair(files: list[str], quant: str) -> tuple[str, str]:
    """The LLM file of exactly `quant` (Q4_K never matches Q4_K_M) and its mmproj (F16 preferred)."""
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    projectors = [f for f in ggufs if Path(f).name.lower().startswith("mmproj")]
    llms = [f for f in ggufs if f not in projectors]
    if not projectors or not llms:
        raise HuatuoError("the repository has GGUF files but not an LLM and an mmproj pair")
    exact = re.compile(rf"(^|[-_.]){re.escape(quant.lower())}\.gguf$")
    wanted = [f for f in llms if exact.search(Path(f).name.lower())]
    if not wanted:
        raise HuatuoError(f"no {quant} GGUF in the repository; available: {', '.join(Path(f).name for f in llms)}")
    if len(wanted) > 1:
        raise HuatuoError(f"several {quant} GGUF files in the repository ({', '.join(wanted)}); pull one by name")
    return wanted[0], sorted(projectors, key=lambda f: ("f16" not in f.lower(), f))[0]


def _copy_into(src: Path, dst: Path, progress=None, stage: str = "copy into store") -> str:
    """A real copy, written under a temporary name: the store never depends on the download cache.
    Returns the file's SHA-256, computed from the same read (one pass over a file of many GB, with
    progress, instead of a silent copy and then a second read to hash it)."""
    tmp = dst.with_name(f".{dst.name}.partial")
    total, done, h = src.stat().st_size, 0, hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(16 * 1024 * 1024):
                h.update(block)
                fout.write(block)
                done += len(block)
                if progress:
                    progress(stage, done, total)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


def _pull_gguf(repo_id: str, listing, quant: str, name: str, folder: Path, progress) -> ResolvedModel:
    from huatuo_local.convert import hub

    llm_file, mm_file = pick_gguf_pair(list(listing.sizes), quant)
    size = listing.sizes.get(llm_file, 0) + listing.sizes.get(mm_file, 0)
    hub.check_space(folder, 2 * size, f"{repo_id} ({size / 1e9:.1f} GB to download and copy into the store)")
    local = hub.download(repo_id, [llm_file, mm_file], listing.sha, progress)
    llm_src, mm_src = local / llm_file, local / mm_file
    info = check_gguf(llm_src, "llm")
    check_gguf(mm_src, "mmproj")
    folder.mkdir(parents=True, exist_ok=True)
    llm, mm = folder / Path(llm_file).name, folder / Path(mm_file).name
    mm_sha = sha256_file(mm_src)
    if not (mm.is_file() and not mm.is_symlink() and sha256_file(mm) == mm_sha):
        _copy_into(mm_src, mm, progress, "store: projector")
    llm_sha = _copy_into(llm_src, llm, progress, "store: model")
    remove_snapshot(repo_id, listing.sha)  # copied into the store now
    eos = info.fields.get(keys.EOS_ID)
    n_embd = info.fields.get(f"{info.arch}.embedding_length")
    if not isinstance(eos, int) or not isinstance(n_embd, int):
        raise HuatuoError(f"{repo_id}: {llm_file} lacks its eos token or embedding length; not a usable model")
    manifest = Manifest(name=name, llm_file=llm.name, mmproj_file=mm.name, quant=quant, mmproj_type="",
                        arch=info.arch, source=repo_id, eos_id=eos, n_embd=n_embd, llm_sha256=llm_sha,
                        mmproj_sha256=mm_sha, converter="downloaded", revision=listing.sha)
    manifest_path = folder / f"{llm.name[: -len('.gguf')]}{MANIFEST_SUFFIX}"
    manifest.write(manifest_path)
    return resolve(f"{name}:{quant.lower()}")


def store_name_for(source: str) -> str:
    """A store name from a checkpoint folder or repo id: its last part, in the characters names allow."""
    return re.sub(r"[^\w.-]+", "-", Path(source.rstrip("/")).name).lstrip(".-_") or "model"


KEEP = ("lossless", "checkpoint", "none")


@dataclass
class Pulled:
    """What `pull` did: the model now installed, and how it got there."""

    model: ResolvedModel
    already: bool = False  # NAME:QUANT was installed before: nothing was done
    made_from: str = ""  # where its weights came from: "download", "NAME:bf16", "kept checkpoint", a folder
    kept: str = ""  # what was kept to make other quants without downloading (a store ref), with its size


def _same_revision(have: str, wanted: str | None) -> bool:
    """An installed model's commit answers for `--revision` when none is asked or it is that commit."""
    return wanted is None or bool(have) and have.startswith(wanted.lower()) and len(wanted) >= 7


def _installed(name: str, quant: str, revision: str | None) -> ResolvedModel | None:
    try:
        found = resolve(f"{name}:{quant.lower()}")
    except HuatuoError:
        return None
    return found if _same_revision(found.manifest.revision if found.manifest else "", revision) else None


def _lossless(name: str, revision: str | None) -> ResolvedModel | None:
    """An installed lossless conversion of `name` (at `revision`) to make another quant from."""
    found = [m for m in list_models() if m.store_name == name and m.quant.upper() in LOSSLESS
             and m.manifest is not None and _same_revision(m.manifest.revision, revision)]
    return sorted(found, key=lambda m: LOSSLESS.index(m.quant.upper()))[0] if found else None


def _size(nbytes: int) -> str:
    return f"{nbytes / 1024**3:.1f} GiB"


def pull(model: str, quant: str | None = None, name: str | None = None, progress=None,
         revision: str | None = None, imatrix=None, keep: str | None = None, force: bool = False) -> Pulled:
    """Fetch `model` into the store as `quant`; `imatrix` (a file or a MatrixMaker, see convert()) is used
    when the model is quantized here, not for a repository of ready GGUF files.

    Nothing is done when NAME:QUANT is installed (unless `force`). Another quant of a model already in the
    store is made without the network from what an earlier pull kept: its lossless conversion (`keep`
    "lossless", the default for downloads: a store model of its own, NAME:bf16) or its checkpoint
    ("checkpoint": the download, recorded as NAME:checkpoint). "none" keeps neither."""
    from huatuo_local.convert import hub
    from huatuo_local.convert.pipeline import check_quant_type, convert, requantize

    known = KNOWN_MODELS.get(model)
    local = Path(model).expanduser()
    repo_id = known.repo_id if known else model
    if not known and not local.is_dir() and not hub.REPO_ID.match(repo_id):
        raise HuatuoError(f"{model}: not a known model ({', '.join(KNOWN_MODELS)}), a checkpoint folder, nor a "
                          "Hugging Face repo id")
    quant = (quant or (known.default_quant if known else "Q4_K_M")).upper()
    check_quant_type(quant)  # before anything reaches the network
    if keep is not None and keep not in KEEP:
        raise HuatuoError(f"--keep {keep}: choose {', '.join(KEEP)}")
    if keep == "checkpoint" and local.is_dir():
        raise HuatuoError(f"--keep checkpoint: {local} is already on this machine; nothing is downloaded to keep")
    keep = keep or ("none" if local.is_dir() else "lossless")
    if revision is not None:
        hub.check_revision(revision)
    name = name or (known.name if known else store_name_for(str(local) if local.is_dir() else repo_id))
    if not is_valid_name(name):
        raise HuatuoError(f"--name {name}: use letters, digits, '.', '_' and '-' (no folders)")
    folder = store_folder(name)
    if not force:
        installed = _installed(name, quant, revision)
        if installed is not None:
            return Pulled(installed, already=True)
    if local.is_dir():  # a checkpoint copied onto an offline machine: converted straight into the store
        result = convert(local, folder, quant=quant, name=name, progress=progress, source=str(local.resolve()),
                         imatrix=imatrix, keep_lossless=keep == "lossless")
        return _done(name, quant, str(local), result)
    lossless = _lossless(name, revision)
    if lossless is not None and lossless.quant.upper() != quant:
        requantize(lossless.manifest_path, quant, progress, imatrix=imatrix)
        return Pulled(resolve(f"{name}:{quant.lower()}"), made_from=lossless.ref)
    kept = KeptCheckpoint.read(folder) if folder.is_dir() else None
    if kept is not None and kept.repo_id == repo_id and _same_revision(kept.revision, revision):
        result = convert(kept.folder, folder, quant=quant, name=name, progress=progress, revision=kept.revision,
                         source=repo_id, imatrix=imatrix, keep_lossless=keep == "lossless")
        return _done(name, quant, f"{name}:checkpoint", result)
    listing = hub.list_repo(repo_id, revision)
    if any(f.lower().endswith(".gguf") for f in listing.sizes):
        with writing_into(folder), terminate_as_interrupt():  # one writer; SIGTERM cleans up as Ctrl-C does
            return Pulled(_pull_gguf(repo_id, listing, quant, name, folder, progress), made_from="download")
    local, sha = hub.fetch_checkpoint(repo_id, listing.sha, progress, store=folder)
    result = convert(local, folder, quant=quant, name=name, progress=progress, revision=sha, source=repo_id,
                     imatrix=imatrix, keep_lossless=keep == "lossless")
    pulled = _done(name, quant, "download", result)
    if keep == "checkpoint":
        size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        KeptCheckpoint(repo_id, sha, size).write(folder)
        pulled.kept = f"{name}:checkpoint ({_size(size)}, the download)"
    else:
        remove_snapshot(repo_id, sha)  # ours, and converted now
    return pulled


def _done(name: str, quant: str, made_from: str, result) -> Pulled:
    kept = ""
    if result.lossless is not None:
        lossless = resolve(result.lossless.manifest_path)
        kept = f"{name}:{lossless.quant.lower()} ({_size(result.lossless.llm_path.stat().st_size)}, lossless)"
    return Pulled(resolve(f"{name}:{quant.lower()}"), made_from=made_from, kept=kept)
