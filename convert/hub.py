"""Hugging Face downloads: only the files a conversion needs, resumable, with progress."""

from __future__ import annotations

import re
from pathlib import Path

from huatuo_local.models.errors import HuatuoError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_FILES = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json",
]


def looks_like_repo(text: str) -> bool:
    return bool(REPO_ID.match(text)) and not Path(text).exists()


def download(repo_id: str, patterns: list[str] | None = None, subfolder: str | None = None) -> Path:
    """Fetch (or resume) a snapshot of the files matching `patterns`; return its local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    pats = patterns or CHECKPOINT_FILES
    if subfolder:
        pats = [f"{subfolder.strip('/')}/{p}" for p in pats]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=pats))
    except RepositoryNotFoundError as exc:
        raise HuatuoError(
            f"{repo_id}: no such Hugging Face repository (or it is private; run `hf auth login`)") from exc
    except LocalEntryNotFoundError as exc:
        raise HuatuoError(
            f"{repo_id}: cannot download (no network?) and not in the local cache; "
            "download it elsewhere and pass the folder instead"
        ) from exc
    except Exception as exc:  # HTTP errors, OS errors and httpx's own, which share no narrower base
        raise HuatuoError(f"{repo_id}: download failed ({exc}); run the command again to resume") from exc
    return folder / subfolder if subfolder else folder


def download_tower(repo_id: str) -> Path:
    return download(repo_id, ["config.json", "preprocessor_config.json", "*.safetensors", "pytorch_model.bin"])
