"""On-disk cache of encoded image prefixes: ask about the same scan in a new process without
encoding the image or evaluating its tokens again.

An entry is the KV cache of a conversation's beginning up to and including an image,
saved by llama.cpp (`llama_state_seq_save_file`) under a key made of the model files'
identity, the KV type, the exact tokens before the image and the prepared image's hash.
Entries stay on this machine (under HUATUO_LOCAL_HOME, readable by the owner only) and the
oldest are evicted beyond a size budget. HUATUO_LOCAL_PREFIX_CACHE=0 or --no-prefix-cache
turns it off.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DEFAULT_BUDGET_MB = 4096


def model_identity(*files: Path) -> str:
    parts = []
    for f in files:
        st = Path(f).stat()
        parts.append(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class PrefixCache:
    def __init__(self, folder: Path, model_id: str, budget_mb: int = DEFAULT_BUDGET_MB):
        self.folder = Path(folder)
        self.model_id = model_id
        self.budget = budget_mb * 1024 * 1024

    @classmethod
    def default(cls, model_id: str) -> PrefixCache | None:
        if os.environ.get("HUATUO_LOCAL_PREFIX_CACHE", "1") == "0":
            return None
        from huatuo_local.models.store import home

        return cls(home() / "prefix-cache", model_id,
                   int(os.environ.get("HUATUO_LOCAL_PREFIX_CACHE_MB", DEFAULT_BUDGET_MB)))

    def key(self, items: list, kv_type: str) -> str:
        h = hashlib.sha256(f"{self.model_id}|{kv_type}|".encode())
        for item in items:
            h.update(f"i:{item.digest};".encode() if hasattr(item, "digest") else f"t:{int(item)};".encode())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.kv"

    def lookup(self, key: str) -> Path | None:
        p = self.path(key)
        if p.is_file():
            os.utime(p)  # most recently used
            return p
        return None

    def store(self, key: str, save) -> None:
        """`save(path)` writes the entry; done under a temporary name, then renamed."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.path(key)
        tmp = final.with_name(final.name + ".partial")
        old_umask = os.umask(0o077)
        try:
            ok = save(tmp)
        finally:
            os.umask(old_umask)
        if ok and tmp.is_file():
            tmp.replace(final)
            self._evict()
        else:
            tmp.unlink(missing_ok=True)

    def _evict(self) -> None:
        entries = sorted(self.folder.glob("*.kv"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for p in entries:
            total += p.stat().st_size
            if total > self.budget:
                p.unlink(missing_ok=True)
