"""An eval run's folder: the append-only answers (`results.jsonl`), the run's identity, resume.

The run's only state is `results.jsonl`: every answer appended and synced as it arrives (the first
answer per record number wins, a torn last line is cut off), which makes Ctrl-C, crashes, resume and
Ray retries safe by construction. A folder holding another run (other data, model or settings) is
refused in one line.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.manifest import sha256_file
from huatuo_local.models.private import private_dir, write_private
from huatuo_local.runtime.eval.worker import EvalSettings

RESULTS = "results.jsonl"

RUN = "run.json"

def read_rows(path: Path) -> list[dict]:
    """The answers a run holds, first answer per record number; a torn last line (a crash) is cut off."""
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    good = 0
    with open(path, "rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # written halfway when the process died
        try:
            row = json.loads(line)
            number = int(row["number"])
        except (ValueError, KeyError, TypeError):
            line_no = data[:good].count(b"\n") + 1
            raise HuatuoError(f"{path}: line {line_no} is not a result; move the file away to start over") from None
        rows.setdefault(number, row)
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return list(rows.values())

class ResultsFile:
    """results.jsonl, appended one answer per line and synced, so an interrupted run loses nothing."""

    def __init__(self, path: Path):
        self.path = path
        self.numbers = {r["number"] for r in read_rows(path)}
        if not path.exists():
            write_private(path, "")
        self._f = open(path, "a", encoding="utf-8")

    def append(self, row: dict) -> bool:
        if row["number"] in self.numbers:
            return False  # a retried batch may answer a record twice: the first answer stays
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.numbers.add(row["number"])
        return True

    def close(self) -> None:
        self._f.close()

def run_identity(data: Path, model, settings: EvalSettings) -> dict:
    """What makes two runs comparable: the same questions, model files and generation settings."""
    manifest = model.manifest
    identity = {
        "data": str(Path(data).resolve()), "data_sha256": sha256_file(Path(data)),
        "model": model.ref, "quant": model.quant,
        "llm_sha256": manifest.llm_sha256 if manifest else "",
        "mmproj_sha256": manifest.mmproj_sha256 if manifest else "",
        # No stop strings (the release's evaluation has none) is left out, so runs saved before stop strings
        # existed still resume and compare.
        "settings": {k: v for k, v in asdict(settings).items() if not (k == "stop" and not v)},
    }
    return json.loads(json.dumps(identity))  # as it is saved and read back (a tuple reads back as a list)

def open_run(out: Path, identity: dict, extra: dict) -> ResultsFile:
    """Create or resume the run in `out`; a folder holding another run is refused."""
    private_dir(out)
    run_file = out / RUN
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text(encoding="utf-8"))["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            raise HuatuoError(f"{run_file}: unreadable; choose another --out or remove {out}") from None
        diff = [k for k in identity if saved.get(k) != identity[k]]
        if diff:
            raise HuatuoError(f"{out} holds a run with another {', '.join(diff)}; choose another --out "
                              "(or rerun with that run's settings to continue it)")
    else:
        write_private(run_file, json.dumps({"identity": identity, **extra}, indent=2, ensure_ascii=False))
    return ResultsFile(out / RESULTS)


def eprint(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)
