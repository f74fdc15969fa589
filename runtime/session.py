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

from .engine import Engine, EngineError
from .images import LoadOptions, load_rgb, prepare
from .prefix_cache import CacheEntryError, PrefixCache
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
        self.notices: list[str] = []  # warnings for the user, handed out with the next reply
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
        """Load the longest on-disk prefix ending at an image beyond `common`.

        Returns the new `common` on a hit, -1 when there is nothing to load, and 0 when an
        entry was unusable: it is deleted with one warning and the KV cache is emptied, so
        the caller evaluates everything and the answer is the no-cache answer.
        """
        cache = self.prefix_cache
        if cache is None:
            return -1
        for k in range(len(items) - 1, common - 1, -1):
            if not isinstance(items[k], ImageItem):
                continue
            prefix = items[: k + 1]
            key = cache.key(prefix)
            path = cache.lookup(key)
            if path is None:
                continue
            # The entry holds an encoded image: a build that fails the vision probe must not be
            # let through just because the work was done earlier.
            self.engine.verify_vision()
            try:
                entry = cache.read(path, key, prefix)
                if any(w != self.engine.image_tokens for w in entry.image_widths):
                    raise CacheEntryError(f"image widths {entry.image_widths} differ from this mmproj's "
                                          f"{self.engine.image_tokens}")
                restored = self.engine.restore_sequence_state(entry.payload)
                if restored != entry.positions:
                    raise CacheEntryError(f"llama.cpp restored {restored} of {entry.positions} positions")
            except CacheEntryError as exc:
                cache.discard(path)
                self.notices.append(f"warning: prefix cache entry {path.name} was unusable ({exc}); "
                                    "deleted it and computed the prefix again")
                self.engine.truncate(0)
                self.cached = []
                return 0
            images = [it for it in prefix if isinstance(it, ImageItem)]
            for it, width in zip(images, entry.image_widths):
                self._image_widths[it.digest] = width
            self.cached = list(prefix)
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
        elif restored == 0:
            common, pos = 0, 0
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
                    self._save_prefix(items[: i + 1])
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

    def _save_prefix(self, prefix: list[Item]) -> None:
        cache = self.prefix_cache
        assert cache is not None
        key = cache.key(prefix)
        if cache.lookup(key) is not None:
            return
        widths = [self._image_widths[it.digest] for it in prefix if isinstance(it, ImageItem)]
        try:
            cache.store(key, prefix, widths, self.engine.n_past, self.engine.sequence_state())
        except (OSError, EngineError) as exc:  # a cache that cannot be written only costs time
            self.notices.append(f"warning: could not save the prefix cache entry ({exc})")

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
            notes = [w for w in (engine.vision_warning, *self.notices) if w]
            self.notices.clear()
            self.last_reply = Reply(answer, generated, prompt_positions, delta, timings, "\n".join(notes) or None)

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
