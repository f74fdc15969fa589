"""The small JSON file written beside a converted GGUF pair; the runtime reads it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import HuatuoError

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
MAX_MANIFEST_BYTES = 1024 * 1024


def is_plain_file_name(name: object) -> bool:
    """A bare file name: no folder part, not `.`/`..`, no NUL; what manifests and indexes may name."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and Path(name).name == name)


@dataclass
class Manifest:
    name: str
    llm_file: str  # relative to the manifest's folder
    mmproj_file: str
    quant: str
    mmproj_type: str
    arch: str
    source: str
    eos_id: int
    n_embd: int
    llm_sha256: str = ""
    mmproj_sha256: str = ""
    converter: str = ""
    revision: str = ""  # the Hugging Face commit sha a pulled model came from
    format_version: int = MANIFEST_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def imatrix_file(self) -> str | None:
        """The importance matrix the LLM was quantized with, kept beside it; None when there is none
        (or the entry does not name a plain file in the manifest's folder)."""
        entry = self.extra.get("imatrix")
        name = entry.get("file") if isinstance(entry, dict) else None
        return name if is_plain_file_name(name) else None

    def write(self, path: Path) -> None:
        tmp = Path(path).with_name(f".{Path(path).name}.partial")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Read and validate a manifest; a hostile or damaged one gets one line, never a crash."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise ValueError("too large")
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError("not an object")
            manifest = cls(**data)
        except (OSError, ValueError, TypeError, RecursionError) as exc:
            raise HuatuoError(f"{path}: unreadable model manifest; convert the model again") from exc
        manifest._validate(path)
        return manifest

    def _validate(self, path: Path) -> None:
        for key, kind in _FIELD_TYPES.items():
            if not isinstance(getattr(self, key), kind) or isinstance(getattr(self, key), bool) and kind is int:
                raise HuatuoError(f"{path}: field {key} has the wrong type; convert the model again")
        for key in ("llm_file", "mmproj_file"):
            if not is_plain_file_name(getattr(self, key)):
                # A manifest names files beside itself, never elsewhere: `../x` or `/etc/x` would
                # let a downloaded manifest point the runtime (or `rm`) at any file on the machine.
                raise HuatuoError(f"{path}: {key} must be a file name in the manifest's folder; "
                                  "convert the model again")


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024, on_read: Callable[[int], None] | None = None) -> str:
    """The file's SHA-256; `on_read(n)` after each block, for a progress bar (a 15 GB model takes seconds)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_read:
                on_read(len(block))
    return h.hexdigest()


_FIELD_TYPES = {
    "name": str, "llm_file": str, "mmproj_file": str, "quant": str, "mmproj_type": str, "arch": str,
    "source": str, "eos_id": int, "n_embd": int, "llm_sha256": str, "mmproj_sha256": str, "converter": str,
    "revision": str, "format_version": int, "extra": dict,
}
