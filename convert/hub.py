"""Hugging Face downloads: exactly the files a conversion needs, pinned to one commit, resumable.

A repository is listed once (`model_info` with file sizes and the commit sha); the files are
chosen from that list, the disk space is checked, and everything is downloaded at that
commit into $HUATUO_LOCAL_HOME/downloads, so a conversion never mixes two revisions. An
interrupted file resumes with an HTTP Range request, in the same run and in the next one.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.store import COMMIT, REPO_ID, downloads_dir, snapshot_dir

REVISION = re.compile(r"[A-Za-z0-9][\w.\-/]{0,199}")
# Files read beside the weights, at the top of the repo (and config/preprocessor in a tower folder).
SIDE_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
)
TOWER_SIDE_FILES = ("config.json", "preprocessor_config.json")
# Converting holds the download, a lossless intermediate and the result: about 2.5x the download.
CONVERT_SPACE_FACTOR = 2.5
Progress = Callable[[str, int, int], None]


def looks_like_repo(text: str) -> bool:
    return bool(REPO_ID.match(text)) and not Path(text).exists()


@dataclass
class RepoListing:
    repo_id: str
    sha: str
    sizes: dict[str, int]  # path in the repo -> bytes


def hub_error(repo_id: str, exc: BaseException) -> HuatuoError:
    """One line that says what actually went wrong, not "cannot reach" for every failure."""
    from huggingface_hub import errors

    if isinstance(exc, HuatuoError):
        return exc
    if isinstance(exc, errors.GatedRepoError):
        return HuatuoError(f"{repo_id}: gated repository; accept its licence on the website, then `hf auth login`")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HuatuoError(f"{repo_id}: no such Hugging Face repository (or it is private; run `hf auth login`)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HuatuoError(f"{repo_id}: no such revision (check --revision)")
    if isinstance(exc, errors.EntryNotFoundError):
        return HuatuoError(f"{repo_id}: a listed file is missing from the repository ({exc}); try another revision")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return HuatuoError(f"{repo_id}: disk full while downloading; free space and run the command again to resume")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return HuatuoError(f"{repo_id}: access denied (HTTP {status}); run `hf auth login` with a token that "
                               "can read it")
        return HuatuoError(f"{repo_id}: the Hub answered HTTP {status}; try again later (downloads resume)")
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) or _is_connection_error(exc):
        return HuatuoError(
            f"{repo_id}: cannot reach Hugging Face ({type(exc).__name__}); on an offline machine copy the "
            "checkpoint over and run: huatuo-local pull FOLDER --name NAME (converts it into the local store)"
        )
    if isinstance(exc, OSError):
        return HuatuoError(f"{repo_id}: cannot write the download ({exc.strerror or exc}); check the cache folder")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return HuatuoError(f"{repo_id}: download failed ({type(exc).__name__}: {first}); run the command again to resume")


def _is_connection_error(exc: BaseException) -> bool:
    # httpx (and huggingface_hub's vendored copy) name their transport errors like this.
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ConnectError", "TimeoutException", "NetworkError", "ConnectTimeout", "ReadTimeout",
                         "RemoteProtocolError", "ConnectionError"})


def list_repo(repo_id: str, revision: str | None = None) -> RepoListing:
    from huggingface_hub import HfApi

    check_revision(revision)
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # classified into one line by hub_error
        raise hub_error(repo_id, exc) from exc
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    if not isinstance(info.sha, str) or not COMMIT.fullmatch(info.sha):
        # The sha names a folder under downloads/ that is later deleted: a mirror that answers
        # "../../x" (or anything but a commit id) must never get that far.
        raise HuatuoError(f"{repo_id}: the Hub answered {str(info.sha)[:60]!r} where a commit id (40 hex digits) "
                          "belongs; check HF_ENDPOINT")
    return RepoListing(repo_id, info.sha, sizes)


def check_revision(revision: str | None) -> None:
    """--revision is a branch, tag or commit the Hub resolves; refuse what no ref can be."""
    if revision is None:
        return
    if not REVISION.fullmatch(revision) or ".." in revision or revision.endswith(("/", ".lock")):
        raise HuatuoError(f"--revision {revision!r}: give a branch, tag or commit id (letters, digits, '.', '_', "
                          "'-', '/')")


def weight_files(files: list[str], folder: str = "") -> list[str]:
    """The weights directly inside `folder` (repo-relative), safetensors preferred over .bin."""
    prefix = f"{folder.strip('/')}/" if folder else ""
    here = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
    for pattern, index in (("*.safetensors", "model.safetensors.index.json"),
                           ("pytorch_model*.bin", "pytorch_model.bin.index.json")):
        chosen = sorted(f for f in here if fnmatch.fnmatch(f, pattern))
        if chosen:
            return [prefix + f for f in (*chosen, *([index] if index in here else []))]
    return []


def _tower_folder(config: dict, files: list[str]) -> str | None:
    """The repo sub-folder `mm_vision_tower` names, when the tower ships inside the repo."""
    named = config.get("mm_vision_tower")
    if not isinstance(named, str) or not named or named.startswith("/"):
        return None
    folder = str(PurePosixPath(named))
    if ".." in PurePosixPath(folder).parts:
        return None
    return folder if any(f.startswith(folder + "/") for f in files) else None


def checkpoint_files(listing: RepoListing, config: dict) -> list[str]:
    files = list(listing.sizes)
    chosen = [f for f in SIDE_FILES if f in listing.sizes] + weight_files(files)
    tower = _tower_folder(config, files)
    if tower:
        chosen += [f"{tower}/{f}" for f in TOWER_SIDE_FILES if f"{tower}/{f}" in listing.sizes]
        chosen += weight_files(files, tower)
    return list(dict.fromkeys(chosen))


def check_space(where: Path, need: int, what: str) -> None:
    """Refuse before downloading what cannot fit; `where` may not exist yet."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise HuatuoError(f"{what} needs about {need / 1e9:.1f} GB free but {probe} has {free / 1e9:.1f} GB; "
                          "free space (or set HF_HOME / HUATUO_LOCAL_HOME to a larger disk) and run it again")


def _bar_class(progress: Progress | None):
    """A tqdm class that reports byte counts to our (stage, done, total) callback instead of drawing."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            self._stage = f"download {kwargs.get('desc') or ''}".strip()[:40]
            self._bytes = kwargs.get("unit") == "B"
            self._total = int(kwargs.get("total") or 0)
            self._done = int(kwargs.get("initial") or 0)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            self._done += int(n or 0)
            if progress and self._bytes:
                progress(self._stage, self._done, max(self._total, self._done))

    return Bar


def download(repo_id: str, files: list[str], revision: str, progress: Progress | None = None) -> Path:
    """Download exactly `files` at `revision` (a commit sha) into our own snapshot folder; returns it.

    Each file goes to `NAME.partial` and is renamed when complete and verified (size, and the
    SHA-256 the Hub gives as ETag for large files). A rerun after Ctrl-C or a crash resumes
    every partial file with an HTTP Range request: huggingface_hub >= 1.x downloads into a
    process-unique temporary file and discards it, so it would start a 15 GB file over.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    root = snapshot_dir(repo_id, revision)
    bar = _bar_class(progress)
    try:
        for name in files:
            target = root / name
            if root.resolve() not in target.resolve().parents:
                raise HuatuoError(f"{repo_id}: refusing the file name {name!r} (outside the download folder)")
            if target.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            meta = get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision))
            partial = target.with_name(f"{target.name}.partial")
            have = partial.stat().st_size if partial.is_file() else 0
            if meta.size is not None and have > meta.size:
                have = 0
            with open(partial, "r+b" if have else "wb") as fh:
                fh.seek(have)
                fh.truncate()
                if meta.size is None or have < meta.size:
                    http_get(meta.location, fh, resume_size=have, headers=build_hf_headers(),
                             expected_size=meta.size, displayed_filename=name, tqdm_class=bar)
            _verify(repo_id, name, partial, meta.size, meta.etag)
            partial.replace(target)
    except HuatuoError:
        raise
    except Exception as exc:  # classified into one line by hub_error
        raise hub_error(repo_id, exc) from exc
    return root


def _verify(repo_id: str, name: str, path: Path, size: int | None, etag: str | None) -> None:
    if size is not None and path.stat().st_size != size:
        raise HuatuoError(f"{repo_id}: {name} arrived with {path.stat().st_size} of {size} bytes; run the command "
                          "again to resume")
    if etag and re.fullmatch(r"[0-9a-f]{64}", etag):  # large (LFS) files: the ETag is the content's SHA-256
        from huatuo_local.models.manifest import sha256_file

        if sha256_file(path) != etag:
            path.unlink(missing_ok=True)
            raise HuatuoError(f"{repo_id}: {name} failed its checksum (damaged in transit); run the command again")


def read_json(repo_id: str, filename: str, revision: str) -> dict:
    try:
        path = download(repo_id, [filename], revision) / filename
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise HuatuoError(f"{repo_id}: {filename} is not valid JSON; not a checkpoint to convert") from exc
    except Exception as exc:  # classified into one line by hub_error
        raise hub_error(repo_id, exc) from exc
    if not isinstance(data, dict):
        raise HuatuoError(f"{repo_id}: {filename} is not a JSON object")
    return data


def fetch_checkpoint(repo_id: str, revision: str | None = None, progress: Progress | None = None,
                     store: Path | None = None) -> tuple[Path, str]:
    """Download a checkpoint's needed files (tower sub-folder included); returns (folder, commit sha).

    With `store`, the space for converting into it is checked before anything large is fetched.
    """
    listing = list_repo(repo_id, revision)
    if "config.json" not in listing.sizes:
        raise HuatuoError(f"{repo_id}: no config.json in the repository; not a HuatuoGPT-Vision checkpoint")
    config = read_json(repo_id, "config.json", listing.sha)
    files = checkpoint_files(listing, config)
    if not weight_files(list(listing.sizes)):
        raise HuatuoError(f"{repo_id}: no weights (*.safetensors or pytorch_model*.bin) in the repository")
    total = sum(listing.sizes.get(f, 0) for f in files)
    check_space(store if store is not None else downloads_dir(), int(total * CONVERT_SPACE_FACTOR),
                f"{repo_id} ({total / 1e9:.1f} GB to download, about {CONVERT_SPACE_FACTOR}x that while converting)")
    return download(repo_id, files, listing.sha, progress), listing.sha


def download_tower(repo_id: str) -> Path:
    listing = list_repo(repo_id)
    files = [f for f in TOWER_SIDE_FILES if f in listing.sizes] + weight_files(list(listing.sizes))
    return download(repo_id, files, listing.sha)
