"""`eval --ray`: one model replica per Ray actor, the questions spread over them in small batches.

Each actor is an `EvalWorker` (its own model, scheduler and parallel sequences) on one machine
(or GPU), loading the model from the path or store name it is given (a shared folder, or each
machine's own store). The images travel with each batch, so only the driver needs the evaluation
files.
The driver keeps every actor busy with a few batches, appends each answer to the run's
results.jsonl as its batch returns, and resubmits a batch whose actor died to a new actor: the
file is the only record, so an answer is never lost nor written twice, and a rerun resumes.

Ray is an optional extra: `pip install 'huatuo-local[distributed]'`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.evaluation import Record
from huatuo_local.runtime.cluster.session import RaySession
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.eval.results import ResultsFile, eprint
from huatuo_local.runtime.eval.worker import EvalSettings, EvalWorker

MAX_REPLACEMENTS = 8  # actors started to replace dead ones before the run gives up


class _Replica:
    """The actor's body: an EvalWorker answering one batch at a time."""

    def __init__(self, config: ModelConfig, settings: dict):
        self.worker = EvalWorker(config, EvalSettings(**settings))

    def answer(self, records: list[Record], images: dict[str, bytes]) -> list[dict]:
        import dataclasses

        from huatuo_local.runtime.images.loader import ImageData

        # The batch's images arrive as bytes and are read from memory: nothing lands on this machine's
        # disk, so an actor killed mid-batch leaves nothing behind.
        local = {original: ImageData(data, original) for original, data in images.items()}
        here = [dataclasses.replace(r, images=tuple(local.get(str(p), p) for p in r.images)) for r in records]
        return list(self.worker.answer(here))

    def pid(self) -> int:
        return os.getpid()


def _image_bytes(records: list[Record]) -> dict[str, bytes]:
    """Each image of a batch, read here (an unreadable one is left to the worker's error path)."""
    out: dict[str, bytes] = {}
    for r in records:
        for p in r.images:
            if str(p) not in out:
                try:
                    out[str(p)] = Path(p).read_bytes()
                except OSError:
                    pass
    return out


def answer_with_ray(address: str, config: ModelConfig, settings: EvalSettings, pending: list[Record],
                    results: ResultsFile, on_row: Callable[[dict], None], workers: int | None = None,
                    batch: int | None = None) -> None:
    session = RaySession(address)
    ray = session.ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        n = workers or max(1, len([nd for nd in ray.nodes() if nd.get("Alive")]))
        replica = ray.remote(num_cpus=0)(_Replica).options(scheduling_strategy="SPREAD")
        size = batch or 2 * max(1, config.parallel)
        todo = sorted(pending, key=lambda r: (r.images, r.number))  # a batch shares images where it can
        batches = [todo[i:i + size] for i in range(0, len(todo), size)]
        actors = [replica.remote(config, asdict(settings)) for _ in range(n)]
        eprint(f"eval: {n} Ray workers, {len(batches)} batches of up to {size} questions")
        inflight: dict = {}  # ref -> (actor, batch)
        replacements = 0

        def submit(actor, b: list[Record]):
            # The images travel with the batch: only this machine needs the evaluation files.
            return actor.answer.remote(b, _image_bytes(b))

        def feed(actor) -> None:
            if batches:
                b = batches.pop(0)
                inflight[submit(actor, b)] = (actor, b)

        for actor in actors:
            for _ in range(2):  # one answering, one waiting: no idle gap between batches
                feed(actor)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            actor, b = inflight.pop(ref)
            try:
                rows = ray.get(ref)
            except RayActorError as exc:
                # The actor (its process or machine) died: its batches go to a new actor.
                replacements += 1
                if replacements > MAX_REPLACEMENTS:
                    why = str(exc).strip().splitlines()[-1][:300]
                    raise HuatuoError(f"eval: {replacements} Ray workers died (last: {why}); the answers so far "
                                      "are kept, rerun to continue") from None
                eprint("eval: a Ray worker died; its questions go to a new one")
                lost = [b]
                for r, (a, bb) in list(inflight.items()):
                    if a is actor:
                        del inflight[r]
                        lost.append(bb)
                fresh = replica.remote(config, asdict(settings))
                for bb in lost:
                    inflight[submit(fresh, bb)] = (fresh, bb)
                continue
            except RayTaskError as exc:
                raise HuatuoError(f"eval: a Ray worker failed: {str(exc.cause) if exc.cause else exc}") from None
            for row in rows:
                if results.append(row):
                    on_row(row)
            feed(actor)
    finally:
        session.close()

