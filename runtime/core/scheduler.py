"""One scheduler per loaded model: every conversation (chat, HuatuoChatbot, serve) runs here.

The scheduler owns the engine's N sequences ("slots") and one thread that loops:

1. admit queued jobs (fair FIFO, bounded) into free slots, choosing the slot whose KV cache
   already holds the longest prefix of the job's items, else loading one from the on-disk
   prefix cache; only what differs is evaluated;
2. start encoding the next image of a prefilling slot on a worker thread (CLIP runs beside
   the language model, so streams keep flowing while an image is read);
3. decode one chunk of a ready image's embeddings for one slot;
4. one llama_decode batching the next token of every generating slot with a chunk of some
   slot's prompt text;
5. sample each slot's next token from its own logits (core/sampling.py, the release's
   semantics), and hand the text to the job's consumer.

A slot's `cached` list always says exactly what its sequence holds, position by position
(an image is one item of `engine.image_tokens` positions); any failure empties the slot.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.core.events import Done, Event, Failed, Piece, Progress
from huatuo_local.runtime.core.items import ImageItem, Item
from huatuo_local.runtime.core.prefix_cache import CacheEntryError, PrefixCache
from huatuo_local.runtime.core.sampling import SamplingParams, TokenLogprob, log_softmax_at, next_token, top_tokens
from huatuo_local.runtime.core.stops import StopFilter
from huatuo_local.runtime.core.structured import Constraint, ll_tokenizer
from huatuo_local.runtime.engine.engine import DecodeAborted, Engine, EngineError
from huatuo_local.runtime.engine.probe import vision_warning
from huatuo_local.runtime.trace import mark


class QueueFull(HuatuoError):
    """More jobs are waiting than --max-queue allows."""


class ContextFull(EngineError):
    """The prompt does not fit in a sequence's context."""


class ShuttingDown(EngineError):
    """The scheduler is closing: the job was refused, dropped from the queue, or ended past the grace period."""


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
    queued_s: float = 0.0


@dataclass
class Result:
    """What a finished job hands back with its last event."""

    tokens: list[int]
    text: str
    prompt_positions: int
    finish_reason: str  # "stop" (eos, a stop string or a complete document), "length", "cancelled", "prefilled"
    counters: Counters
    timings: Timings
    notices: list[str]
    logits: np.ndarray | None = None  # prefill-only jobs: the last position's logits
    logprobs: list[TokenLogprob] | None = None  # with params.logprobs: one per answer token
    first_scores: list[float] | None = None  # with params.score_tokens: their raw scores at the first token


@dataclass(eq=False)
class Job:
    items: list[Item]
    params: SamplingParams
    rng: np.random.Generator | None = None
    prefill_only: bool = False  # evaluate the items, keep their logits, generate nothing
    slot_hint: int | None = None  # a conversation's own slot, when it has one
    # Called with each step's logits; may return replacement logits (benchmarks steer answers).
    logit_hook: Callable[[np.ndarray], np.ndarray | None] | None = None
    # Called (in the consumer's thread) with Progress while the prompt is read: images, positions.
    on_progress: Callable[[Progress], None] | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    # Instead of the queue: called from the scheduler's thread with each event (the server hands
    # events to its asyncio loop this way, without a thread per waiting client).
    on_event: Callable[[Event], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # Who may reuse whose work: prefixes (in a slot or on disk) are shared only within one tenant, so
    # one API key's client learns nothing of another's conversations from reuse counters or timing.
    tenant: str = ""
    error: Exception | None = None  # set by abort(): the job ends with this error

    def cancel(self) -> None:
        self.cancelled.set()

    def abort(self, error: Exception) -> None:
        """Cancel, and end with `error` instead of a cancelled answer (the consumer did not ask to stop)."""
        self.error = error
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        """Progress and Piece events, then one Done or Failed (runtime/core/events.py)."""
        if self.on_event is not None:
            try:
                self.on_event(event)
            except RuntimeError:  # the consumer's event loop is gone (server shutting down)
                self.cancel()
        else:
            self.events.put(event)

    def stream(self) -> Iterator[str]:
        """The answer's text as it is generated; `result` is set when the iterator ends.

        Closing the iterator early (a client that went away, Ctrl-C) cancels the job.
        """
        finished = False
        try:
            while True:
                event = self.events.get()
                if isinstance(event, Piece):
                    yield event.text
                elif isinstance(event, Progress):
                    if self.on_progress is not None:
                        self.on_progress(event)
                elif isinstance(event, Done):
                    self.result = event.result
                    finished = True
                    return
                else:
                    finished = True
                    raise event.error
        finally:
            if not finished:
                self.cancel()

    def wait(self) -> Result:
        for _ in self.stream():
            pass
        return self.result


@dataclass(eq=False)
class _Slot:
    seq: int
    cached: list[Item] = field(default_factory=list)
    pos: int = 0
    job: Job | None = None
    pending: list[Item] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    last_token: int | None = None
    embd: Future | None = None  # the next pending image's embeddings, being encoded
    embd_done: int = 0  # positions of that image already decoded
    prompt_start: int = 0  # positions reused when the job started
    prompt_total: int = 0  # positions of the whole prompt
    encode_started: float = 0.0
    decoder: object = None
    stops: StopFilter | None = None  # the job's stop strings, when it has any
    constraint: Constraint | None = None  # the job's grammar state, when it has a schema
    logprobs: list[TokenLogprob] = field(default_factory=list)  # every answer token's, with params.logprobs
    logprobs_sent: int = 0  # how many of them went out with a Piece
    first_scores: list[float] | None = None
    counters: Counters = field(default_factory=Counters)
    timings: Timings = field(default_factory=Timings)
    notices: list[str] = field(default_factory=list)
    t_start: float = 0.0
    t_gen: float = 0.0
    last_used: float = 0.0
    tenant: str = ""  # whose conversation `cached` holds


class Scheduler:
    def __init__(self, engine: Engine, prefix_cache: PrefixCache | None = None, max_queue: int = 0,
                 chunk: int | None = None, abortable: bool = False):
        self.engine = engine
        self.prefix_cache = prefix_cache
        self.max_queue = max_queue  # 0: unbounded (chat, eval); serve sets it
        self.chunk = chunk or engine.options.ubatch  # prompt positions per step
        self.slots = [_Slot(seq) for seq in range(engine.n_seq)]
        self.vision_warning: str | None = None  # set once the vision probe is asked (check_vision)
        self._vision_checked = False
        self._queue: deque[Job] = deque()
        self._lock = threading.Condition()
        # With `abortable`, a decode whose jobs were all cancelled stops between operations instead of
        # finishing its chunk (Ctrl-C in a chat: a 256-position chunk of a 7B takes seconds on a CPU).
        self._decoding: list[Job] = []
        if abortable:
            me = weakref.ref(self)  # the engine keeps the check: no cycle back to this scheduler

            def check() -> bool:
                sched = me()
                return bool(sched and sched._decoding and all(j.cancelled.is_set() for j in sched._decoding))

            engine.set_abort_check(check)
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="huatuo-encode")
        self._closed = False
        self._refusing = False  # shut_down(): no new jobs, the running ones finish
        self._thread = threading.Thread(target=self._run, name="huatuo-scheduler", daemon=True)
        self._thread.start()

    # --- the public side ------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.engine.options.n_ctx

    def width(self, item: Item) -> int:
        return self.engine.image_tokens if isinstance(item, ImageItem) else 1

    def positions(self, items: list[Item]) -> int:
        return sum(self.width(it) for it in items)

    def submit(self, job: Job) -> Job:
        need = self.positions(job.items)
        if need > self.n_ctx:
            raise ContextFull(f"the conversation needs {need} positions but the context holds {self.n_ctx}; "
                              "raise --ctx or start a new conversation")
        if job.params.grammar is not None:  # built once per model, here rather than in the loop every slot shares
            ll_tokenizer(self.engine.tokenizer, self.engine.eos_id)
        with self._lock:
            if self._closed or self._refusing:
                raise ShuttingDown("the model is shutting down")
            waiting = len(self._queue)
            if self.max_queue and waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting; try again shortly")
            self._queue.append(job)
            self._lock.notify_all()
        return job

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def active(self) -> int:
        with self._lock:
            return sum(1 for s in self.slots if s.job is not None)

    def slot_positions(self, seq: int) -> int:
        """Positions the sequence holds now (tests and counters)."""
        return self.slots[seq].pos

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for job in self._queue:
                job.emit(Failed(ShuttingDown("the model is shutting down")))
            self._queue.clear()
            for s in self.slots:
                if s.job is not None:
                    s.job.cancel()
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self._encoder.shutdown(wait=True, cancel_futures=True)

    def shut_down(self, grace_s: float) -> None:
        """Stop taking jobs: the queued ones end now with ShuttingDown, the running ones may finish within
        `grace_s` and are then ended with ShuttingDown too (a server's SIGTERM)."""
        with self._lock:
            self._refusing = True
            for job in self._queue:
                job.emit(Failed(ShuttingDown("the server is shutting down")))
            self._queue.clear()
            self._lock.notify_all()

        def overdue() -> None:
            with self._lock:
                for s in self.slots:
                    if s.job is not None:
                        s.job.abort(ShuttingDown("the server is shutting down; the answer was cut short"))
                self._lock.notify_all()

        timer = threading.Timer(grace_s, overdue)
        timer.daemon = True
        timer.start()

    # --- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                with self._lock:
                    while not self._closed and not self._queue and not any(s.job for s in self.slots):
                        self._lock.wait()
                    if self._closed and not any(s.job for s in self.slots):
                        return
                    self._admit()
                self._step()
            except BaseException as exc:  # never let the loop die: fail what was running
                self._fail_all(exc)

    def _admit(self) -> None:
        """Move queued jobs into free slots (called with the lock held)."""
        kept: deque[Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if job.cancelled.is_set():
                job.emit(Done(self._empty_result(job, "cancelled")))
                continue
            slot = self._choose_slot(job)
            if slot is None:
                kept.append(job)
                # FIFO: a job that must wait for its own slot does not hold back others.
                continue
            try:
                self._start(slot, job)
            except BaseException as exc:  # e.g. a vision probe that fails before a cache hit
                self._fail(slot, exc, locked=True)
        self._queue = kept

    def _choose_slot(self, job: Job) -> _Slot | None:
        free = [s for s in self.slots if s.job is None]
        if job.slot_hint is not None:
            hinted = self.slots[job.slot_hint % len(self.slots)]
            return hinted if hinted.job is None else None
        if not free:
            return None
        return max(free, key=lambda s: (self._reusable(s, job), -s.last_used))

    def _reusable(self, slot: _Slot, job: Job) -> int:
        """Leading items of `job` the slot holds and may give it (never across tenants)."""
        return self._common(slot.cached, job.items) if slot.tenant == job.tenant else 0

    @staticmethod
    def _common(cached: list[Item], items: list[Item]) -> int:
        """How many leading items the sequence already holds."""
        n = 0
        for a, b in zip(cached, items):
            if a != b:
                break
            n += 1
        return n

    def _start(self, slot: _Slot, job: Job) -> None:
        slot.job = job
        slot.generated, slot.pieces, slot.last_token = [], [], None
        slot.counters, slot.timings, slot.notices = Counters(), Timings(), []
        slot.t_start = time.perf_counter()
        slot.timings.queued_s = slot.t_start - job.submitted
        slot.decoder = self.engine.tokenizer.text_decoder()
        slot.stops = StopFilter(job.params.stop) if job.params.stop else None
        slot.constraint, slot.logprobs, slot.logprobs_sent, slot.first_scores = None, [], 0, None
        slot.embd, slot.embd_done = None, 0
        items = job.items
        common = self._reusable(slot, job)
        slot.tenant = job.tenant
        if common == len(items) and items and not (job.prefill_only and isinstance(items[-1], ImageItem)):
            common -= 1  # the whole prompt is cached: evaluate its last item again for its logits
        pos = self.positions(items[:common])
        restored = self._restore_from_disk(slot, items, common)
        if restored > 0:
            common, pos = restored, slot.pos
        elif restored == 0:
            common, pos = 0, 0
        self.engine.seq_rm(slot.seq, pos)
        slot.cached, slot.pos = list(items[:common]), pos
        slot.pending = list(items[common:])
        slot.counters.tokens_reused = pos
        slot.prompt_start, slot.prompt_total = pos, self.positions(items)
        if not slot.pending:
            # The sequence (or the disk cache, which holds prefixes ending at an image) already has a
            # turn's images read ahead of their question: nothing to evaluate, no logits wanted.
            self._settle_idle(slot)

    def _settle_idle(self, slot: _Slot) -> None:
        """End a job that has nothing left to evaluate or generate (else the loop would spin on it)."""
        job = slot.job
        if job is None:
            return
        if job.prefill_only:
            self._finish(slot, "prefilled")
        else:  # a full prompt ends with text; an answer needs the logits of its last position
            self._fail(slot, EngineError("internal: a prompt ended with an image"))

    def _restore_from_disk(self, slot: _Slot, items: list[Item], common: int) -> int:
        """Load the longest on-disk prefix ending at an image beyond `common`.

        Returns the new `common` on a hit, -1 when there is nothing to load, and 0 when an
        entry was unusable: it is deleted with one warning and the slot is emptied, so the
        job evaluates everything and the answer is the no-cache answer.
        """
        cache = self.prefix_cache
        if cache is None:
            return -1
        for k in range(len(items) - 1, common - 1, -1):
            if not isinstance(items[k], ImageItem):
                continue
            prefix = items[: k + 1]
            key = cache.key(prefix, slot.tenant)
            path = cache.lookup(key)
            if path is None:
                continue
            # The entry holds an encoded image: a build that fails the vision probe must not be
            # let through just because the work was done earlier.
            self.check_vision()
            try:
                entry = cache.read(path, key, prefix)
                if any(w != self.engine.image_tokens for w in entry.image_widths):
                    raise CacheEntryError(f"image widths {entry.image_widths} differ from this mmproj's "
                                          f"{self.engine.image_tokens}")
                restored = self.engine.restore_sequence_state(slot.seq, entry.payload)
                if restored != entry.positions:
                    raise CacheEntryError(f"llama.cpp restored {restored} of {entry.positions} positions")
            except CacheEntryError as exc:
                cache.discard(path)
                slot.notices.append(f"warning: prefix cache entry {path.name} was unusable ({exc}); "
                                    "deleted it and computed the prefix again")
                self.engine.seq_rm(slot.seq, 0)
                slot.cached, slot.pos = [], 0
                return 0
            slot.cached, slot.pos = list(prefix), restored
            slot.counters.prefix_cache_hits += 1
            return k + 1
        return -1

    def _step(self) -> None:
        # Jobs cancelled by their consumer leave first.
        for s in self.slots:
            if s.job is not None and s.job.cancelled.is_set():
                if s.job.error is not None:
                    self._fail(s, s.job.error)
                else:
                    self._finish(s, "cancelled")
            elif s.job is not None and not s.pending and s.last_token is None and s.embd is None:
                self._settle_idle(s)  # a job with no work left must end, never keep the loop busy
        self._step_images()
        self._step_tokens()

    # --- images -----------------------------------------------------------------------

    def _step_images(self) -> None:
        waiting = [s for s in self.slots if s.job is not None and s.pending and isinstance(s.pending[0], ImageItem)]
        for s in waiting:
            if s.embd is None:
                s.encode_started = time.perf_counter()
                s.embd = self._encoder.submit(self._encode, s.pending[0].picture)
                self._progress(s, "encoding image")
        ready = [s for s in waiting if s.embd is not None and s.embd.done()]
        if not ready:
            tokens_to_run = any(s.job is not None and (s.last_token is not None or (
                s.pending and not isinstance(s.pending[0], ImageItem))) for s in self.slots)
            if waiting and not tokens_to_run:
                # Only images are being read: wait for the encoder rather than spin.
                wait([s.embd for s in waiting if s.embd is not None], timeout=0.1, return_when=FIRST_COMPLETED)
            return
        s = min(ready, key=lambda x: x.t_start)  # one image chunk per step, oldest job first
        try:
            embd = s.embd.result()
        except BaseException as exc:
            self._fail(s, exc)
            return
        if s.embd_done == 0:
            s.timings.image_encode_s += time.perf_counter() - s.encode_started
            s.counters.images_encoded += 1
        t0 = time.perf_counter()
        end = min(len(embd), s.embd_done + self.chunk)
        try:
            self._decoding = [s.job] if s.job is not None else []
            self.engine.decode_embeddings(s.seq, embd[s.embd_done:end], s.pos + s.embd_done)
        except DecodeAborted:
            self._aborted([s])
            return
        except BaseException as exc:
            self._fail(s, exc)
            return
        finally:
            self._decoding = []
        s.timings.prompt_s += time.perf_counter() - t0
        s.embd_done = end
        self._progress(s, "reading", s.pos + end)
        if end == len(embd):
            image = s.pending.pop(0)
            s.cached.append(image)
            s.pos += len(embd)
            s.counters.prompt_tokens_evaluated += len(embd)
            s.embd, s.embd_done = None, 0
            if self.prefix_cache is not None:
                self._save_prefix(s)
            if not s.pending:
                self._settle_idle(s)  # a turn's images, read before its question

    def _encode(self, picture) -> np.ndarray:
        """One image's embeddings (on the encoder thread), from a library the vision probe has passed."""
        self.check_vision()
        mark("vision probe")
        embeddings = self.engine.encode_image(picture)
        mark("image encoded")
        return embeddings

    def check_vision(self) -> None:
        """Images only from a library the vision probe has passed (engine/probe.py), asked once for this
        model; with --allow-unverified-vision, `vision_warning` is shown beside every answer instead."""
        if not self._vision_checked:
            self.vision_warning = vision_warning(self.engine.options.allow_unverified_vision)
            self._vision_checked = True

    def _save_prefix(self, s: _Slot) -> None:
        cache = self.prefix_cache
        assert cache is not None
        key = cache.key(s.cached, s.tenant)
        if cache.lookup(key) is not None:
            return
        widths = [self.engine.image_tokens for it in s.cached if isinstance(it, ImageItem)]
        try:
            cache.store(key, s.cached, widths, s.pos, self.engine.sequence_state(s.seq))
        except (OSError, EngineError) as exc:  # a cache that cannot be written only costs time
            s.notices.append(f"warning: could not save the prefix cache entry ({exc})")

    # --- tokens -----------------------------------------------------------------------

    def _step_tokens(self) -> None:
        entries, owners, runs = self._token_batch()
        if not entries:
            return
        t0 = time.perf_counter()
        involved = list({id(x): x for x in [o[0] for o in owners] + [r[0] for r in runs]}.values())
        try:
            self._decoding = [x.job for x in involved if x.job is not None]
            self.engine.decode_tokens(entries)
        except DecodeAborted:
            self._aborted(involved)
            return
        except BaseException as exc:
            for s in involved:
                self._fail(s, exc)
            return
        finally:
            self._decoding = []
        elapsed = time.perf_counter() - t0
        for s, n in runs:
            s.cached.extend(int(t) for t in s.pending[:n])
            s.pending = s.pending[n:]
            s.pos += n
            s.counters.prompt_tokens_evaluated += n
            s.timings.prompt_s += elapsed
            self._progress(s, "reading")
        for s, index, kind in owners:
            if kind == "gen":
                s.cached.append(s.last_token)
                s.pos += 1
            if s.job is None:
                continue
            try:
                self._after_logits(s, self.engine.logits_at(index))
            except Exception as exc:  # one job's sampling or text fails that job alone, never the batch
                self._fail(s, exc)

    def _token_batch(self) -> tuple[list[tuple[int, int, int, bool]], list[tuple[_Slot, int, str]],
                                    list[tuple[_Slot, int]]]:
        """This step's batch: every generating slot's next token, then prompt text up to one chunk.

        Returns the entries (seq, token, position, wants logits), who reads which logits
        (slot, batch index, "gen" or "prompt"), and how many prompt tokens each slot sends."""
        entries: list[tuple[int, int, int, bool]] = []
        owners: list[tuple[_Slot, int, str]] = []
        for s in self.slots:  # every generating slot advances by one token
            if s.job is not None and s.last_token is not None:
                if s.pos + 1 > self.n_ctx:
                    self._finish(s, "length")
                    continue
                entries.append((s.seq, s.last_token, s.pos, True))
                owners.append((s, len(entries) - 1, "gen"))
        budget = max(max(self.chunk, 1) - len(entries), 1)
        # Then prompt text, oldest job first, as much as the chunk allows.
        prefilling = sorted((s for s in self.slots if s.job is not None and s.last_token is None and s.pending
                             and not isinstance(s.pending[0], ImageItem)), key=lambda x: x.t_start)
        runs: list[tuple[_Slot, int]] = []
        for s in prefilling:
            if budget <= 0:
                break
            n = 0
            while n < len(s.pending) and n < budget and not isinstance(s.pending[n], ImageItem):
                n += 1
            last = n == len(s.pending)
            for i in range(n):
                entries.append((s.seq, int(s.pending[i]), s.pos + i, last and i == n - 1))
            if last:
                owners.append((s, len(entries) - 1, "prompt"))
            runs.append((s, n))
            budget -= n
        return entries, owners, runs

    def _after_logits(self, s: _Slot, logits: np.ndarray) -> None:
        job = s.job
        assert job is not None
        if job.logit_hook is not None:
            replaced = job.logit_hook(logits)
            if replaced is not None:
                logits = replaced
        if job.prefill_only:
            self._finish(s, "prefilled", np.array(logits))  # a copy: the buffer is reused by the next decode
            return
        if not s.generated and s.last_token is None:
            s.t_gen = time.perf_counter()
            s.timings.first_token_s = s.t_gen - s.t_start
        params = job.params
        if params.score_tokens and not s.generated:
            s.first_scores = [float(logits[t]) for t in params.score_tokens]
        raw = logits.copy() if params.logprobs is not None else None  # the model's own distribution
        if params.grammar is not None:
            if s.constraint is None:
                s.constraint = Constraint(params.grammar, self.engine.tokenizer, self.engine.eos_id)
            if s.constraint.complete:  # the document is whole: nothing may follow it
                self._finish(s, "stop")
                return
            s.constraint.mask(logits)
        tok = next_token(logits, s.generated, params, job.rng or np.random.default_rng(), self.engine.eos_id)
        if tok == self.engine.eos_id:
            self._finish(s, "stop")
            return
        if s.constraint is not None and not s.constraint.accept(tok):  # only the end was left (min_tokens)
            self._finish(s, "stop")
            return
        s.generated.append(tok)
        if raw is not None:
            s.logprobs.append(self._logprob(raw, tok, params.logprobs or 0))
        piece = s.decoder.feed(tok)
        if s.stops is not None:
            piece = s.stops.feed(piece)
        if piece:
            s.pieces.append(piece)
            job.emit(Piece(piece, self._unsent_logprobs(s)))
        if s.stops is not None and s.stops.stopped:  # this token completed a stop string: nothing after it
            self._finish(s, "stop")
            return
        if len(s.generated) >= job.params.max_new_tokens:
            self._finish(s, "length")
            return
        s.last_token = tok

    def _logprob(self, raw: np.ndarray, token: int, n: int) -> TokenLogprob:
        """`token`'s log-probability in `raw` (the model's scores) and the n most likely tokens there."""
        tok = self.engine.tokenizer
        best = top_tokens(raw, n)
        values = log_softmax_at(raw, np.concatenate([[token], best]).astype(np.int64))

        def shown(t: int) -> tuple[str, tuple[int, ...]]:
            data = tok.token_bytes(int(t), special=True)
            return data.decode("utf-8", "replace"), tuple(data)

        text, data = shown(token)
        return TokenLogprob(int(token), text, data, float(values[0]),
                            tuple((*shown(t), float(v)) for t, v in zip(best, values[1:])))

    def _unsent_logprobs(self, s: _Slot) -> tuple:
        """The answer tokens' log-probabilities not yet sent with a piece."""
        out = tuple(s.logprobs[s.logprobs_sent:])
        s.logprobs_sent = len(s.logprobs)
        return out

    def _progress(self, s: _Slot, stage: str, pos: int | None = None) -> None:
        if s.job is not None and s.job.on_progress is not None:
            s.job.emit(Progress(stage, (s.pos if pos is None else pos) - s.prompt_start,
                                s.prompt_total - s.prompt_start))

    # --- endings ----------------------------------------------------------------------

    def _finish(self, s: _Slot, reason: str, logits: np.ndarray | None = None) -> None:
        job = s.job
        if job is None:
            return
        tail = s.decoder.flush() if s.decoder is not None else ""
        if s.stops is not None:  # what was held back as a possible stop string's start, and the tail
            tail = s.stops.feed(tail) + s.stops.finish()
        unsent = self._unsent_logprobs(s)
        if tail or unsent:
            s.pieces.append(tail)
            job.emit(Piece(tail, unsent))
        if s.t_gen:
            s.timings.generation_s = time.perf_counter() - s.t_gen
        s.counters.tokens_generated = len(s.generated)
        prompt_positions = self.positions(job.items)
        result = Result(list(s.generated), "".join(s.pieces).strip(), prompt_positions, reason, s.counters,
                        s.timings, list(s.notices), logits,
                        list(s.logprobs) if job.params.logprobs is not None else None, s.first_scores)
        self._release(s)
        job.emit(Done(result))

    def _aborted(self, slots: list[_Slot]) -> None:
        """A stopped decode left part of its batch in the KV cache: remove it, then end the cancelled jobs."""
        for s in slots:
            self.engine.seq_rm(s.seq, s.pos)  # s.pos and s.cached still say what was there before
            if s.embd is not None:
                s.embd_done = 0
            if s.job is not None and s.job.cancelled.is_set():
                self._finish(s, "cancelled")

    def _fail(self, s: _Slot, exc: BaseException, locked: bool = False) -> None:
        job = s.job
        # A failed or interrupted prefill leaves the sequence in an unknown state: start clean.
        try:
            self.engine.seq_rm(s.seq, 0)
        except Exception:
            pass
        s.cached, s.pos = [], 0
        self._release(s, locked)
        if job is not None:
            job.emit(Failed(exc if isinstance(exc, Exception) else EngineError(str(exc))))

    def _release(self, s: _Slot, locked: bool = False) -> None:
        if s.embd is not None:
            s.embd.cancel()
        s.job, s.pending, s.last_token, s.embd, s.embd_done = None, [], None, None, 0
        s.t_gen = 0.0
        s.last_used = time.perf_counter()
        if locked:
            self._lock.notify_all()
        else:
            with self._lock:
                self._lock.notify_all()

    def _fail_all(self, exc: BaseException) -> None:
        for s in self.slots:
            if s.job is not None:
                self._fail(s, exc)

    def _empty_result(self, job: Job, reason: str) -> Result:
        return Result([], "", self.positions(job.items), reason, Counters(), Timings(), [])
