"""Reading the JSON files of a checkpoint or a model, which may be damaged or hostile.

One place for every failure a JSON file can cause (missing, unreadable, not UTF-8, not JSON,
nested deep enough to exhaust the parser's recursion, larger than any real one): each
becomes one CheckpointError line that names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError

MAX_JSON_BYTES = 256 * 1024 * 1024  # a real tokenizer.json is ~7 MB


def read_json(path: str | Path, fix: str = "download it again", expect: type | None = None) -> Any:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: larger than any real checkpoint file; {fix}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: not found; {fix}") from exc
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON; {fix}") from exc
    if expect is not None and not isinstance(data, expect):
        raise CheckpointError(f"{path}: not a JSON {'object' if expect is dict else expect.__name__}; {fix}")
    return data
