"""On-disk cache of encoded image prefixes: ask about the same scan in a new process without
encoding the image or evaluating its tokens again.

An entry is the KV state of a conversation's beginning up to and including an image
(llama.cpp's sequence state), behind a header that says exactly what it holds:

    MAGIC | u64 header length | header JSON | payload (llama_state_seq_get_data)

The file's name is a hash of everything that changes the meaning of the state: the model's
and mmproj's content checksums (recorded at convert time), the engine build, the KV type,
the context size, the tokens and the prepared images' digests. The header repeats all of it,
with the image widths, the position count and the payload's SHA-256, and every field is
checked before llama.cpp sees a byte: a truncated, flipped, swapped, foreign or tampered
entry is deleted with one warning and the prefix is computed again, so the answer is the
no-cache answer. Entries stay on this machine, owner-only (0700 folder, 0600 files); the
oldest are evicted beyond a size budget. HUATUO_LOCAL_PREFIX_CACHE=0 or --no-prefix-cache
turns it off; `huatuo-local cache info|clear` shows or removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from huatuo_local.models.manifest import sha256_file
from huatuo_local.models.private import private_dir, write_private

DEFAULT_BUDGET_MB = 4096
MAGIC = b"HUATUO-KV\x01"
ENTRY_SUFFIX = ".kv"
_MAX_HEADER = 16 * 1024 * 1024
_CHECKSUMS = "checksums.json"


class CacheEntryError(Exception):
    """An entry that must not be used; the message says why (shown in the one warning)."""


def folder() -> Path:
    from huatuo_local.models.store import home

    return home() / "prefix-cache"


def file_checksum(path: Path) -> str:
    """SHA-256 of a model file without a manifest, computed once per file version and remembered."""
    path = Path(path)
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    memo_path = folder() / _CHECKSUMS
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo.get(stamp), str):
        return memo[stamp]
    digest = sha256_file(path)
    memo[stamp] = digest
    try:
        private_dir(memo_path.parent)
        write_private(memo_path, json.dumps(memo))
    except OSError:
        pass
    return digest


@dataclass(frozen=True)
class Entry:
    positions: int
    image_widths: list[int]
    payload: bytes


def describe(items: list) -> list[str]:
    """Items as the header and the key name them: `t:ID` for a token, `i:SHA256` for an image."""
    return [f"i:{it.digest}" if hasattr(it, "digest") else f"t:{int(it)}" for it in items]


class PrefixCache:
    def __init__(self, root: Path, identity: dict[str, str], budget_mb: int = DEFAULT_BUDGET_MB):
        self.folder = Path(root)
        self.identity = dict(sorted(identity.items()))
        self.budget = budget_mb * 1024 * 1024

    @classmethod
    def default(cls, identity: dict[str, str]) -> PrefixCache | None:
        if os.environ.get("HUATUO_LOCAL_PREFIX_CACHE", "1") == "0":
            return None
        try:
            budget = int(os.environ.get("HUATUO_LOCAL_PREFIX_CACHE_MB", DEFAULT_BUDGET_MB))
        except ValueError:
            budget = DEFAULT_BUDGET_MB
        return cls(folder(), identity, budget)

    def key(self, items: list, tenant: str = "") -> str:
        """The entry's name; `tenant` (an API key's digest on a server with several) salts it, so one
        tenant never finds another's entries."""
        h = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        if tenant:
            h.update(b"tenant:" + tenant.encode() + b";")
        for d in describe(items):
            h.update(d.encode() + b";")
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{ENTRY_SUFFIX}"

    def lookup(self, key: str) -> Path | None:
        p = self.path(key)
        if p.is_file() and not p.is_symlink():
            try:
                os.utime(p)  # most recently used
            except OSError:
                pass
            return p
        return None

    def read(self, path: Path, key: str, items: list) -> Entry:
        """The verified entry at `path` for `items`; CacheEntryError names what is wrong."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CacheEntryError(f"unreadable ({exc.strerror or exc})") from exc
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
            raise CacheEntryError("not a huatuo-local cache entry (old format or damaged)")
        (n,) = struct.unpack_from("<Q", data, len(MAGIC))
        start = len(MAGIC) + 8
        if n > _MAX_HEADER or start + n > len(data):
            raise CacheEntryError("truncated header")
        try:
            header = json.loads(data[start:start + n].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CacheEntryError("damaged header") from exc
        if not isinstance(header, dict):
            raise CacheEntryError("damaged header")
        payload = data[start + n:]
        if header.get("key") != key:
            raise CacheEntryError("holds another conversation's prefix (renamed or swapped)")
        if header.get("identity") != self.identity:
            raise CacheEntryError("made by another model, mmproj, engine build, KV type or context size")
        if header.get("items") != describe(items):
            raise CacheEntryError("its tokens or images differ from its name")
        if header.get("payload_bytes") != len(payload):
            raise CacheEntryError(f"truncated ({len(payload)} of {header.get('payload_bytes')} state bytes)")
        if header.get("payload_sha256") != hashlib.sha256(payload).hexdigest():
            raise CacheEntryError("checksum mismatch (the file was changed or damaged)")
        widths, positions = header.get("image_widths"), header.get("positions")
        n_images = sum(1 for it in items if hasattr(it, "digest"))
        if (not isinstance(widths, list) or len(widths) != n_images
                or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
                or not isinstance(positions, int) or positions != len(items) - n_images + sum(widths)):
            raise CacheEntryError("inconsistent image widths or position count")
        return Entry(positions, widths, payload)

    def store(self, key: str, items: list, image_widths: list[int], positions: int, payload: bytes) -> None:
        header = json.dumps({
            "key": key, "identity": self.identity, "items": describe(items), "image_widths": image_widths,
            "positions": positions, "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(), "created": time.time(),
        }).encode()
        private_dir(self.folder)
        write_private(self.path(key), MAGIC + struct.pack("<Q", len(header)) + header + payload)
        self._evict()

    def discard(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def _evict(self) -> None:
        entries = sorted(entries_in(self.folder), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for p in entries:
            total += p.stat().st_size
            if total > self.budget:
                p.unlink(missing_ok=True)


def entries_in(root: Path) -> list[Path]:
    """The cache's own entry files (nothing else in the folder is ever touched)."""
    if not root.is_dir():
        return []
    return [p for p in root.glob(f"*{ENTRY_SUFFIX}") if p.is_file() and not p.is_symlink()
            and len(p.stem) == 64 and all(c in "0123456789abcdef" for c in p.stem)]


@dataclass
class CacheInfo:
    folder: Path
    entries: int
    bytes: int
    oldest: float | None
    newest: float | None


def info(root: Path | None = None) -> CacheInfo:
    root = root or folder()
    found = entries_in(root)
    times = [p.stat().st_mtime for p in found]
    return CacheInfo(root, len(found), sum(p.stat().st_size for p in found),
                     min(times) if times else None, max(times) if times else None)


def clear(root: Path | None = None) -> CacheInfo:
    """Delete every entry (and the checksum memo, and leftovers of interrupted writes); returns what went."""
    root = root or folder()
    before = info(root)
    for p in entries_in(root):
        p.unlink(missing_ok=True)
    if root.is_dir():
        for p in [root / _CHECKSUMS, *root.glob(".*.partial")]:
            if p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
    return before
