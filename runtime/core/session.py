"""A conversation: turns, images, sampling and the counters; its turns run on the scheduler.

Every turn re-renders the whole conversation exactly as the release does (chunk-wise
tokenization around each image, answers re-tokenized from text) and submits it to the
scheduler, which evaluates only what differs from what the conversation's sequence already
holds. Earlier images are never encoded again while they stay there. `prefill_next_turn`
evaluates the beginning every follow-up shares while the user is still typing it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.prompt import MAX_IMAGES, Turn, segments_before_question
from huatuo_local.runtime.core.items import ImageItem, Item, conversation_items, image_item, prompt_items
from huatuo_local.runtime.core.prefix_cache import PrefixCache
from huatuo_local.runtime.core.record import answer_record
from huatuo_local.runtime.core.sampling import SamplingParams
from huatuo_local.runtime.core.scheduler import Counters, Job, Scheduler, Timings
from huatuo_local.runtime.engine.engine import Engine
from huatuo_local.runtime.images.loader import (
    ImageInput,
    LoadOptions,
    expand_inputs,
    image_source,
    load_input,
    prepare,
)
from huatuo_local.runtime.trace import mark

__all__ = ["Session", "Reply", "Counters", "Timings", "ImageItem", "Item", "image_item"]


@dataclass
class Reply:
    text: str
    tokens: list[int]
    prompt_positions: int
    counters: Counters
    timings: Timings
    warning: str | None = None
    finish_reason: str = "stop"
    logprobs: list | None = None  # with SamplingParams.logprobs: each answer token's (core/sampling.py)
    record: dict | None = None  # what produced this answer (core/record.py)


class Session:
    def __init__(self, engine: Engine | Scheduler, sampling: SamplingParams | None = None,
                 image_options: LoadOptions | None = None, prefix_cache: PrefixCache | None = None,
                 slot: int | None = 0, provenance: dict | None = None):
        if isinstance(engine, Scheduler):
            self.scheduler, self._owns_scheduler = engine, False
        else:
            # Its own scheduler serves one person: Ctrl-C may stop a decode between operations.
            self.scheduler, self._owns_scheduler = Scheduler(engine, prefix_cache, abortable=True), True
        self.engine = self.scheduler.engine
        self.slot = slot  # the sequence this conversation keeps (None: any free one)
        self.image_options = image_options or LoadOptions()
        self.sampling = sampling or SamplingParams()
        self.turns: list[Turn] = []
        self.images: list[ImageItem] = []
        self.counters = Counters()
        self.logit_hook = None  # called with each step's logits; may return replacements
        self._background: Job | None = None
        self.provenance = provenance  # the model side of each answer's record (record.provenance)
        # Without a seed one is drawn, and recorded: a sampled conversation can be replayed exactly.
        self.seed = self.sampling.seed if self.sampling.seed is not None else secrets.randbits(63)
        self._rng = np.random.default_rng(self.seed)

    # --- conversation state --------------------------------------------------------

    def clear(self) -> None:
        self.turns.clear()
        self.images.clear()

    def prepare_images(self, images: list[ImageInput]) -> list[ImageItem]:
        """The pictures the model sees for `images`: paths, studies, PIL images, numpy arrays (images/loader.py)."""
        images = expand_inputs(images, self.image_options)
        if len(self.images) + len(images) > MAX_IMAGES:
            raise HuatuoError(
                f"at most {MAX_IMAGES} images per conversation (the release's limit); start a new conversation "
                "(clear_history() in Python, /clear in the chat), or tile a study's slices with --montage")
        items = []
        for p in images:
            picture = load_input(p, self.image_options)
            items.append(image_item(prepare(picture, self.engine.vision), image_source(p, picture)))
        return items

    def items_for(self, turns: list[Turn], images: list[ImageItem]) -> list[Item]:
        """The release's input: the rendered prompt, tokenized chunk by chunk around each image."""
        return conversation_items(self.engine.tokenizer.tokenize, turns, images)

    @property
    def positions(self) -> int:
        """Positions this conversation's sequence holds now."""
        return self.scheduler.slot_positions(self.slot or 0)

    # --- turns -----------------------------------------------------------------------

    def _submit(self, items: list[Item], params: SamplingParams, prefill_only: bool = False,
                on_progress=None) -> Job:
        job = Job(items, params, self._rng, prefill_only=prefill_only, slot_hint=self.slot,
                  logit_hook=self.logit_hook, on_progress=on_progress)
        return self.scheduler.submit(job)

    def _account(self, result) -> None:
        for k, v in result.counters.__dict__.items():
            setattr(self.counters, k, getattr(self.counters, k) + v)

    def stream(self, text: str, image_paths: list[ImageInput] | None = None,
               params: SamplingParams | None = None, on_progress=None) -> Iterator[str]:
        """Ask one turn; yields the answer's text as it is generated. `last_reply` holds the rest.

        `on_progress(Progress)` is called, in this thread, while the prompt is read."""
        params = params or self.sampling
        new_images = self.prepare_images(list(image_paths or []))
        mark("images prepared")
        turn = Turn(text, len(new_images))
        items = self.items_for([*self.turns, turn], [*self.images, *new_images])
        job = self._submit(items, params, on_progress=on_progress)
        pieces: list[str] = []
        failed = False
        try:
            for piece in job.stream():
                if not pieces:
                    mark("first token")
                pieces.append(piece)
                yield piece
        except Exception:
            failed = True  # the turn did not happen: the conversation stays as it was
            raise
        finally:
            if not failed:  # finished, or stopped by the user (Ctrl-C): the answer so far is kept
                self._record(Turn(text, len(new_images)), new_images, job, pieces, params)

    def _record(self, turn: Turn, new_images: list[ImageItem], job: Job, pieces: list[str],
                params: SamplingParams) -> None:
        result = getattr(job, "result", None)
        answer = result.text if result is not None else "".join(pieces).strip()
        self.turns.append(Turn(turn.text, turn.n_images, answer))
        self.images.extend(new_images)
        if result is None:
            return
        self._account(result)
        notes = [w for w in (self.scheduler.vision_warning, *result.notices) if w]
        record = answer_record(self.provenance, params, self.seed,
                               len(self.turns), self.images)
        self.last_reply = Reply(answer, result.tokens, result.prompt_positions, result.counters, result.timings,
                                "\n".join(notes) or None, result.finish_reason, result.logprobs, record)

    def ask(self, text: str, image_paths: list[ImageInput] | None = None,
            params: SamplingParams | None = None) -> Reply:
        for _ in self.stream(text, image_paths, params):
            pass
        return self.last_reply

    def evaluate(self, items: list[Item]) -> np.ndarray:
        """Bring the sequence to `items` (reusing what it holds) and return the last position's logits."""
        result = self._submit(items, self.sampling, prefill_only=True).wait()
        self._account(result)
        assert result.logits is not None
        return result.logits

    def prefill_images(self, image_paths: list[ImageInput]) -> int:
        """Encode and evaluate the next turn's images before its question is known; returns positions evaluated.

        The release puts a turn's images before its text, so everything up to the last image is
        already fixed when the user picks the images: the REPL runs this in a thread while the
        question is typed. The turn then compares all it reuses as usual, so this can only save
        time, never change an answer.
        """
        new_images = self.prepare_images(list(image_paths))
        if not new_images:
            return 0
        items = prompt_items(self.engine.tokenizer.tokenize, segments_before_question(self.turns, len(new_images)),
                             [*self.images, *new_images])
        last_image = max(i for i, it in enumerate(items) if isinstance(it, ImageItem))
        job = self._submit(items[: last_image + 1], self.sampling, prefill_only=True)
        self._background = job
        try:
            result = job.wait()
        finally:
            self._background = None
        self._account(result)
        return result.counters.prompt_tokens_evaluated

    def cancel_background(self) -> None:
        """Stop a `prefill_images` in progress (Ctrl-C while it runs)."""
        job = self._background
        if job is not None:
            job.cancel()

    def prefill_next_turn(self) -> int:
        """Evaluate what any follow-up starts with; returns the positions evaluated.

        After an answer, every next turn begins with the same tokens (the answer's ending and
        the user tag). Evaluated while the user types (the REPL runs this in a thread), they
        leave the next turn's time to first token. The next turn still compares all it reuses
        with what it needs, so a question that tokenizes differently costs only what differs.
        """
        if not self.turns:
            return 0
        items = prompt_items(self.engine.tokenizer.tokenize, segments_before_question(self.turns), self.images)
        # The last token may merge with the question's first characters (SentencePiece has no
        # pre-tokenizer boundary there): leave it to the next turn.
        items = items[:-1]
        result = self._submit(items, self.sampling, prefill_only=True).wait()
        self._account(result)
        return result.counters.prompt_tokens_evaluated

    def close(self) -> None:
        if self._owns_scheduler:
            self.scheduler.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
