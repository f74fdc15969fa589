"""The release's evaluation: its data file, the query it builds, and how it scores an answer.

Facts from docs/RELEASE.md ("Published accuracy and how it is measured"): records numbered in file
order; open questions, records without options and repeated numbers dropped; the query is the
question, the options as `A. text` lines and a fixed instruction; the predicted letter is the
first match of the release's pattern over the whole output, compared case-sensitively with the
letter of the right option; an answer of `?` is always wrong.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import HuatuoError
from .jsonfile import read_json

LETTERS = "ABCDEFGHIJK"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
# The release's scorer, verbatim: the first match over the whole output, group 2.
LETTER_RE = re.compile(r"(is |是|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([abcdefghijklmnABCDEFGHIJKLMN])(\W|$)", re.S)

# The model card's table (docs/RELEASE.md), in percent.
MODEL_CARD: dict[str, dict[str, float]] = {
    "7B": {"VQA-RAD": 63.7, "SLAKE": 76.2, "PathVQA": 57.9, "PMC-VQA": 54.3, "OmniMedVQA": 74.0,
           "MMMU Health & Medicine": 50.6},
    "34B": {"VQA-RAD": 68.1, "SLAKE": 76.9, "PathVQA": 63.5, "PMC-VQA": 58.2, "OmniMedVQA": 76.9,
            "MMMU Health & Medicine": 54.4},
}
CARD_ORDER = list(MODEL_CARD["7B"])


def card_column(dataset: str) -> str:
    """The model card's column a dataset's records count in (every MMMU-Medical-* set is one column)."""
    return "MMMU Health & Medicine" if dataset.startswith("MMMU") else dataset


@dataclass(frozen=True)
class Record:
    number: int  # position in the file (0-based): the key results are stored under
    question: str
    options: tuple[str, ...]
    answer: str
    images: tuple[Path, ...]
    dataset: str
    subset: str = ""

    @property
    def right_letter(self) -> str | None:
        """The letter of the right option; None for `?` or an answer that is no option (always wrong)."""
        if self.answer == "?" or self.answer not in self.options:
            return None
        return LETTERS[self.options.index(self.answer)]

    @property
    def group(self) -> str:
        """`dataset_subset` as the release reports it, or the dataset alone."""
        return f"{self.dataset}_{self.subset}" if self.subset else self.dataset


def build_query(record: Record) -> str:
    """The user text of the record's one turn (its images go before it, as in every turn)."""
    options = "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(record.options))
    return f"{record.question}\n{options}\n{INSTRUCTION}"


def predicted_letter(output: str) -> str | None:
    m = LETTER_RE.search(output)
    return m.group(2) if m else None


def is_correct(record: Record, output: str) -> bool:
    right = record.right_letter
    return right is not None and predicted_letter(output) == right


def _options(raw: object, where: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        # The file stores some option lists as their Python literal ("['a', 'b']").
        text = raw.strip()
        if not text:
            return ()
        try:
            raw = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise HuatuoError(f"{where}: options {text[:60]!r} are neither a list nor a list's literal") from None
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)) or not all(isinstance(o, (str, int, float)) for o in raw):
        raise HuatuoError(f"{where}: options must be a list of strings")
    if len(raw) > len(LETTERS):
        raise HuatuoError(f"{where}: {len(raw)} options; the release's letters go to {LETTERS[-1]}")
    return tuple(str(o) for o in raw)


def load_records(path: Path) -> tuple[list[Record], dict[str, int]]:
    """The records the release scores, in file order, and how many were dropped for each reason."""
    # The release's file is 3 MB; 64 MB holds twenty times its records.
    data = read_json(path, "give the release's medical_multimodel_evaluation_data.json", list,
                     max_bytes=64 * 1024 * 1024, error=HuatuoError, text_only=True)
    base = Path(path).resolve().parent
    dropped = {"open": 0, "no options": 0}
    records: list[Record] = []
    for number, raw in enumerate(data):
        where = f"{path}: record {number}"
        if not isinstance(raw, dict):
            raise HuatuoError(f"{where}: not an object")
        missing = [k for k in ("question", "answer", "image", "dataset") if k not in raw]
        if missing:
            raise HuatuoError(f"{where}: no {', '.join(missing)} field")
        if raw.get("question_type") == "open":
            dropped["open"] += 1
            continue
        options = _options(raw.get("options"), where)
        if not options:
            dropped["no options"] += 1
            continue
        images = raw["image"] if isinstance(raw["image"], list) else [raw["image"]]
        if not all(isinstance(i, str) and i for i in images):
            raise HuatuoError(f"{where}: image must be a list of paths")
        resolved = []
        for rel in images:
            p = (base / rel).resolve()
            resolved.append(p)
        records.append(Record(number, str(raw["question"]), options, str(raw["answer"]), tuple(resolved),
                              str(raw["dataset"]), str(raw.get("subset") or "")))
    return records, dropped
