"""The small JSON file written beside a converted GGUF pair; the runtime reads it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import HuatuoError

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"


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
    format_version: int = MANIFEST_VERSION
    extra: dict = field(default_factory=dict)

    def write(self, path: Path) -> None:
        tmp = Path(path).with_name(f".{Path(path).name}.partial")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise HuatuoError(f"{path}: unreadable model manifest; convert the model again") from exc


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
