"""Reading the JSON files of a checkpoint or a model, which may be damaged or hostile.

One place for every failure a JSON file can cause (missing, unreadable, not UTF-8, not JSON,
nested deep enough to exhaust the parser's recursion, larger than any real one, a FIFO or device
that would block, text with lone surrogates that no file or terminal can take): each becomes one
line (a CheckpointError, or the caller's error class) that names the file.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from .errors import CheckpointError, HuatuoError

MAX_JSON_BYTES = 256 * 1024 * 1024  # a real tokenizer.json is ~7 MB


def read_json(path: str | Path, fix: str = "download it again", expect: type | None = None,
              max_bytes: int = MAX_JSON_BYTES, error: type[HuatuoError] = CheckpointError,
              text_only: bool = False) -> Any:
    """The JSON in `path`, or `error` naming it and `fix`. `text_only`: its strings must be encodable text
    (no lone surrogates), for files whose strings reach prompts, terminals and other files."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file; {fix}")
        if info.st_size > max_bytes:
            raise error(f"{path}: {info.st_size / 2**20:.0f} MB, larger than any real one "
                        f"(at most {max_bytes / 2**20:.0f} MB); {fix}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{path}: not found; {fix}") from exc
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path}: not valid JSON; {fix}") from exc
    if expect is not None and not isinstance(data, expect):
        raise error(f"{path}: not a JSON {'object' if expect is dict else expect.__name__}; {fix}")
    if text_only and not _encodable(data):
        raise error(f"{path}: holds text that is not valid Unicode (a lone surrogate escape such as \\ud800); {fix}")
    return data


def _encodable(data: Any) -> bool:
    """Every string in `data` (keys too) encodes as UTF-8. Iterative: the parser bounded the depth already,
    but a check must not spend Python's recursion on it."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True
