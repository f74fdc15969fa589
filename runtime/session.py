"""A conversation: turns, images, the KV cache kept between turns, and the counters.

Every turn re-renders the whole conversation exactly as the release does (chunk-wise
tokenization around each image, answers re-tokenized from text), then evaluates only
what differs from what the KV cache already holds. Earlier images are never encoded
again while they stay in the cache. `prefill_next_turn` evaluates the beginning every
follow-up shares while the user is still typing it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.prompt import IMAGE_TOKEN, MAX_IMAGES, Turn, render_prompt
from PIL import Image

from .engine import Engine
from .images import LoadOptions, load_rgb, prepare
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, next_token

_NEXT_QUESTION = "\ue000"  # stands in for a question not asked yet (a private-use character)


@dataclass(frozen=True)
class ImageItem:
    """An image's place in the token stream: compared by content hash, never re-encoded."""

    digest: str
    picture: Image.Image = field(compare=False, hash=False, repr=False)


Item = int | ImageItem


@dataclass
class Counters:
    images_encoded: int = 0
    prompt_tokens_evaluated: int = 0
    tokens_reused: int = 0
    tokens_generated: int = 0
    prefix_cache_hits: int = 0


@dataclass
class Timings:
    image_encode_s: float = 0.0
    prompt_s: float = 0.0
    generation_s: float = 0.0
    first_token_s: float = 0.0


@dataclass
class Reply:
    text: str
    tokens: list[int]
    prompt_positions: int
    counters: Counters
    timings: Timings
    warning: str | None = None


def image_item(picture: Image.Image) -> ImageItem:
    digest = hashlib.sha256(picture.tobytes()).hexdigest()
    return ImageItem(digest, picture)


class Session:
    def __init__(self, engine: Engine, sampling: SamplingParams | None = None,
                 image_options: LoadOptions | None = None, prefix_cache: PrefixCache | None = None):
        self.engine = engine
        self.prefix_cache = prefix_cache
        self.image_options = image_options or LoadOptions()
        self.sampling = sampling or SamplingParams()
        self.turns: list[Turn] = []
        self.images: list[ImageItem] = []
        self.cached: list[Item] = []  # what the KV cache holds, position by position (images atomic)
        self.counters = Counters()
        self._image_widths: dict[str, int] = {}
        self.logit_hook = None  # called with each step's logits (fidelity checks)
        self._rng = np.random.default_rng(self.sampling.seed)

    # --- conversation state --------------------------------------------------------

    def clear(self) -> None:
        self.turns.clear()
        self.images.clear()

    def prepare_images(self, paths: list[str | Path]) -> list[ImageItem]:
        if len(self.images) + len(paths) > MAX_IMAGES:
            raise HuatuoError(
                f"at most {MAX_IMAGES} images per conversation (the release's limit); /clear to start over")
        return [image_item(prepare(load_rgb(p, self.image_options), self.engine.vision)) for p in paths]

    def items_for(self, turns: list[Turn], images: list[ImageItem]) -> list[Item]:
        """The release's input: the rendered prompt, tokenized chunk by chunk around each image."""
        return self._items(render_prompt(turns, IMAGE_TOKEN), images)

    def _items(self, prompt: str, images: list[ImageItem]) -> list[Item]:
        chunks = prompt.split(IMAGE_TOKEN)
        if len(chunks) - 1 != len(images):
            raise HuatuoError("internal: image placeholders and images disagree")
        items: list[Item] = []
        for i, chunk in enumerate(chunks):
            items.extend(self.engine.tokenize(chunk))
            if i < len(images):
                items.append(images[i])
        return items

    # --- evaluation ----------------------------------------------------------------

    def _common_prefix(self, items: list[Item]) -> tuple[int, int]:
        """(items, positions) that the KV cache already holds."""
        common, pos = 0, 0
        for a, b in zip(self.cached, items):
            if a != b:
                break
            common += 1
            pos += self._width(a)
        if common == len(items) and items:
            # The whole prompt is cached: re-evaluate its last item to get its logits back.
            common -= 1
            pos -= self._width(items[-1])
        return common, pos

    def _restore_from_disk(self, items: list[Item], common: int) -> int:
        """Load the longest on-disk prefix ending at an image beyond `common`; new `common` or -1."""
        if self.prefix_cache is None:
            return -1
        for k in range(len(items) - 1, common - 1, -1):
            if not isinstance(items[k], ImageItem):
                continue
            entry = self.prefix_cache.lookup(self.prefix_cache.key(items[: k + 1], self.engine.options.kv_type))
            if entry is None:
                continue
            restored = self.engine.load_sequence(entry)
            if restored <= 0:
                continue
            # Text items take one position each; images whose width this process has not seen
            # share what remains (every image of a LLaVA tower yields the same number of tokens).
            prefix = items[: k + 1]
            pending = {it.digest for it in prefix if isinstance(it, ImageItem) and it.digest not in self._image_widths}
            known = sum(self._width(it) for it in prefix if not isinstance(it, ImageItem) or it.digest not in pending)
            n_pending = sum(1 for it in prefix if isinstance(it, ImageItem) and it.digest in pending)
            for digest in pending:
                self._image_widths[digest] = (restored - known) // n_pending
            self.cached = list(items[: k + 1])
            self.counters.prefix_cache_hits += 1
            return k + 1
        return -1

    def _sync(self, items: list[Item], timings: Timings) -> int:
        """Bring the KV cache to `items`, reusing the common prefix; returns positions reused."""
        try:
            return self._extend_cache(items, timings)
        except BaseException:
            # A failed or interrupted prefill leaves the cache in an unknown state: start clean.
            self.engine.truncate(0)
            self.cached = []
            raise

    def _extend_cache(self, items: list[Item], timings: Timings) -> int:
        engine = self.engine
        common, pos = self._common_prefix(items)
        restored = self._restore_from_disk(items, common)
        if restored > 0:
            common, pos = restored, engine.n_past
        else:
            engine.truncate(pos)
            self.cached = self.cached[:common]
        reused = pos
        i = common
        while i < len(items):
            if isinstance(items[i], ImageItem):
                t0 = time.perf_counter()
                n = engine.eval_image(items[i].picture)
                timings.image_encode_s += time.perf_counter() - t0
                self._image_widths[items[i].digest] = n
                self.counters.images_encoded += 1
                self.counters.prompt_tokens_evaluated += n
                self.cached.append(items[i])
                if self.prefix_cache is not None:
                    key = self.prefix_cache.key(items[: i + 1], engine.options.kv_type)
                    if self.prefix_cache.lookup(key) is None:
                        self.prefix_cache.store(key, engine.save_sequence)
                i += 1
                continue
            j = i
            while j < len(items) and not isinstance(items[j], ImageItem):
                j += 1
            run = [int(t) for t in items[i:j]]
            t0 = time.perf_counter()
            engine.eval_tokens(run, logits_last=(j == len(items)))
            timings.prompt_s += time.perf_counter() - t0
            self.counters.prompt_tokens_evaluated += len(run)
            self.cached.extend(run)
            i = j
        self.counters.tokens_reused += reused
        return reused

    def _width(self, item: Item) -> int:
        return self._image_widths[item.digest] if isinstance(item, ImageItem) else 1

    def stream(self, text: str, image_paths: list[str | Path] | None = None,
               params: SamplingParams | None = None) -> Iterator[str]:
        """Ask one turn; yields the answer's text as it is generated. `last_reply` holds the rest."""
        params = params or self.sampling
        new_images = self.prepare_images(list(image_paths or []))
        turn = Turn(text, len(new_images))
        items = self.items_for([*self.turns, turn], [*self.images, *new_images])
        timings = Timings()
        start = time.perf_counter()
        before = Counters(**self.counters.__dict__)
        self._sync(items, timings)
        prompt_positions = self.engine.n_past
        engine = self.engine
        generated: list[int] = []
        decoder = engine.text_decoder()
        pieces: list[str] = []
        gen_start = time.perf_counter()
        try:
            while len(generated) < params.max_new_tokens:
                logits = engine.logits()
                if self.logit_hook is not None:
                    self.logit_hook(logits)
                tok = next_token(logits, generated, params, self._rng, engine.eos_id)
                if not generated:
                    timings.first_token_s = time.perf_counter() - start
                if tok == engine.eos_id:
                    break
                generated.append(tok)
                piece = decoder.feed(tok)
                if piece:
                    pieces.append(piece)
                    yield piece
                engine.eval_tokens([tok])
                self.cached.append(tok)
            tail = decoder.flush()
            if tail:
                pieces.append(tail)
                yield tail
        finally:
            timings.generation_s = time.perf_counter() - gen_start
            self.counters.tokens_generated += len(generated)
            answer = "".join(pieces).strip()
            self.turns.append(Turn(text, len(new_images), answer))
            self.images.extend(new_images)
            delta = Counters(**{k: getattr(self.counters, k) - getattr(before, k) for k in before.__dict__})
            self.last_reply = Reply(answer, generated, prompt_positions, delta, timings, engine.vision_warning)

    def prefill_next_turn(self) -> int:
        """Evaluate what any follow-up starts with; returns the positions evaluated.

        After an answer, every next turn begins with the same tokens (the answer's ending and
        the user tag). Evaluated while the user types (the REPL runs this in a thread), they
        leave the next turn's time to first token. The next turn still compares all it reuses
        with what it needs, so a question that tokenizes differently costs only what differs.
        """
        if not self.turns:
            return 0
        prompt = render_prompt([*self.turns, Turn(_NEXT_QUESTION)], IMAGE_TOKEN)
        items = self._items(prompt[: prompt.index(_NEXT_QUESTION)], self.images)
        # The last token may merge with the question's first characters (SentencePiece has no
        # pre-tokenizer boundary there): leave it to the next turn.
        items = items[:-1]
        before = self.counters.prompt_tokens_evaluated
        self._sync(items, Timings())
        return self.counters.prompt_tokens_evaluated - before

    def ask(self, text: str, image_paths: list[str | Path] | None = None,
            params: SamplingParams | None = None) -> Reply:
        for _ in self.stream(text, image_paths, params):
            pass
        return self.last_reply
