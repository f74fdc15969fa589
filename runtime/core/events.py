"""What a job tells its consumer, as the scheduler produces it: typed, so that every consumer (Session,
the server's reply, eval) matches on the same classes instead of re-reading ("piece", value) tuples.

A job's events are: any number of `Progress` (while the prompt is read) and `Piece` (while the answer is
generated), then exactly one `Done` (with the Result) or `Failed` (with the exception).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    """How far a job's prompt is: `stage` is "encoding image" or "reading"; positions done of total."""

    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class Piece:
    """A piece of the answer's text, as soon as it is known (stop strings already cut), and, when the job
    asked for them, the log-probabilities of the tokens whose text this piece completes
    (runtime/core/sampling.py TokenLogprob)."""

    text: str
    logprobs: tuple = ()


@dataclass(frozen=True)
class Done:
    """The job ended: its Result (runtime/core/scheduler.py)."""

    result: Any


@dataclass(frozen=True)
class Failed:
    """The job ended with an error."""

    error: Exception


Event = Progress | Piece | Done | Failed
