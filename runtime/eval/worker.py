"""The eval worker: one model, its scheduler and parallel sequences, answering the release's questions.

Each question is one job on the same scheduler as chat (so a greedy answer is chat's), drawing from
its own random stream seeded from 42 and its record number: an answer does not depend on order,
batching, resume or machine. Questions about one image wait until the first has read it, then reuse
its prefix instead of encoding the image again in parallel slots.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from huatuo_local.models import defaults
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.evaluation import LETTERS, Record, build_query, card_column, is_correct, predicted_letter
from huatuo_local.models.prompt import MAX_IMAGES, Turn
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.core.events import Failed, Piece, Progress
from huatuo_local.runtime.core.items import conversation_items, image_item
from huatuo_local.runtime.core.sampling import SamplingParams
from huatuo_local.runtime.core.scheduler import Job, Scheduler
from huatuo_local.runtime.eval.calibration import option_probabilities
from huatuo_local.runtime.images.loader import LoadOptions, load_rgb, prepare

EVAL_CTX = 4096  # the release's 6 images of 576 positions, a question and 256 new tokens fit

@dataclass(frozen=True)
class EvalSettings:
    """How answers are generated; stored with a run and checked when it resumes."""

    temperature: float = defaults.TEMPERATURE
    repetition_penalty: float = defaults.REPETITION_PENALTY
    max_new_tokens: int = 256
    top_k: int = defaults.TOP_K
    top_p: float = defaults.TOP_P
    seed: int = 42
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (none in the release's evaluation)

    @classmethod
    def release(cls, greedy: bool = False, stop: tuple[str, ...] = ()) -> EvalSettings:
        return cls(temperature=0.0, stop=stop) if greedy else cls(stop=stop)

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, repetition_penalty=self.repetition_penalty,
                              max_new_tokens=self.max_new_tokens, top_k=self.top_k, top_p=self.top_p,
                              seed=self.seed, stop=tuple(self.stop))

def row_for(record: Record, output: str, generated: int = 0, finish: str = "stop",
            error: str | None = None, option_scores: list[float] | None = None) -> dict:
    """One line of results.jsonl: the answer and how the release's scorer reads it; with `option_scores`
    (the option letters' raw scores at the answer's first token), each option's probability
    (runtime/eval/calibration.py)."""
    row = {"number": record.number, "dataset": record.dataset, "group": record.group,
           "column": card_column(record.dataset), "output": output, "predicted": predicted_letter(output),
           "right": record.right_letter, "correct": is_correct(record, output), "generated_tokens": generated,
           "finish_reason": finish}
    if option_scores is not None:
        probs = option_probabilities(option_scores)
        row["option_probs"] = {LETTERS[i]: round(p, 6) for i, p in enumerate(probs)}
    if error:
        row["error"] = error
    return row

class EvalWorker:
    """A model, its scheduler and `parallel` sequences, answering records."""

    def __init__(self, config: ModelConfig, settings: EvalSettings):
        from huatuo_local.runtime.core.loading import open_model

        self.settings = settings
        loaded = open_model(config.with_(ctx=config.ctx or EVAL_CTX))
        self.model, self.engine = loaded.model, loaded.engine
        # Enough waiting work that a slot never idles while the driver prepares the next image.
        self.scheduler = Scheduler(self.engine, loaded.cache)
        self.window = 2 * max(1, config.parallel)
        self.pictures: dict[int, list[str]] = {}  # each question's pictures' digests, for its row's record

    def _job(self, record: Record, done: queue.Queue) -> Job | None:
        if len(record.images) > MAX_IMAGES:
            done.put((record, None, f"{len(record.images)} images; the release takes at most {MAX_IMAGES}"))
            return None
        try:
            images = [image_item(prepare(load_rgb(p, LoadOptions()), self.engine.vision)) for p in record.images]
        except HuatuoError as exc:  # the release skips an unreadable image; here it is recorded as wrong
            done.put((record, None, str(exc)))
            return None
        self.pictures[record.number] = [i.digest for i in images]
        items = conversation_items(self.engine.tokenizer.tokenize, [Turn(build_query(record), len(images))], images)
        params = self.settings.sampling()
        letters = self._letter_tokens(len(record.options))
        if letters is not None:  # read at the answer's first token; the answer itself is unchanged
            params.score_tokens = letters
        rng = np.random.default_rng([self.settings.seed, record.number])
        job = Job(items, params, rng, on_event=lambda ev, r=record: done.put((r, ev, None)))
        try:
            return self.scheduler.submit(job)
        except HuatuoError as exc:  # e.g. more positions than the context holds: that question only
            done.put((record, None, str(exc)))
            return None

    def _letter_tokens(self, n: int) -> tuple[int, ...] | None:
        """The option letters' tokens (A, B, ...), when each is one token of this vocabulary."""
        ids = [self.engine.tokenizer.tokenize(letter) for letter in LETTERS[:n]]
        return tuple(i[0] for i in ids) if all(len(i) == 1 for i in ids) else None

    def answer(self, records: Iterable[Record]) -> Iterator[dict]:
        """Rows as answers finish (not in input order). Closing the iterator cancels what is in flight.

        The questions about one image (VQA-RAD and SLAKE ask several per scan) wait until the first of
        them has read it (its answer starts): then they reuse its prefix (the slot's, or the prefix
        cache's) instead of encoding the same image in parallel slots (bench/eval.py).
        """
        groups: dict[tuple, list[Record]] = {}
        for r in sorted(records, key=lambda r: (tuple(str(getattr(p, "name", p)) for p in r.images), r.number)):
            groups.setdefault(r.images, []).append(r)
        ready: deque[Record] = deque(g[0] for g in groups.values())  # one leader per image
        followers = {key: g[1:] for key, g in groups.items()}
        done: queue.Queue = queue.Queue()
        live: dict[int, Job | None] = {}
        try:
            while ready or live:
                while ready and len(live) < self.window:
                    r = ready.popleft()
                    live[r.number] = self._job(r, done)  # None: its error is already queued
                record, event, error = done.get()
                # Its image is read (the answer has started, or it failed): the others about it may
                # start, first in line.
                ready.extendleft(reversed(followers.pop(record.images, [])))
                if isinstance(event, (Piece, Progress)):
                    continue
                live.pop(record.number, None)
                if error is not None:
                    yield row_for(record, "", error=error)
                elif isinstance(event, Failed):
                    yield row_for(record, "", error=str(event.error))
                else:
                    result = event.result
                    row = row_for(record, result.text, len(result.tokens), result.finish_reason,
                                  option_scores=result.first_scores)
                    # The exact pictures the model read (core/record.py): the run's record, question by question.
                    row["picture_sha256"] = self.pictures.pop(record.number, [])
                    yield row
        finally:
            for job in live.values():
                if job is not None:
                    job.cancel()

    def close(self) -> None:
        self.scheduler.close()
        self.engine.close()
