"""`huatuo-local eval`: the release's benchmark questions through the scheduler, resumable.

One worker (`EvalWorker`) owns a model and its scheduler and answers records, keeping every
parallel sequence busy; questions about the same image run back to back so its encoded prefix is
reused (the prefix cache). The driver appends each answer to `results.jsonl` as it arrives, so
Ctrl-C or a crash loses nothing and a rerun continues. `eval_ray.py` runs one worker per Ray actor
and feeds the same file.

Sampling: the release's settings (temperature 0.2, repetition penalty 1.2, 256 new tokens, seed
42). The release seeds once and lets the random stream run through the questions in order, which
no parallel or resumed run can follow; here each question draws from its own stream, seeded from
42 and its record number, so an answer does not depend on order, batching or machine.
"""

from __future__ import annotations

import json
import os
import queue
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from huatuo_local.models import defaults
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.evaluation import Record, build_query, card_column, is_correct, predicted_letter
from huatuo_local.models.manifest import sha256_file
from huatuo_local.models.private import private_dir, write_private
from huatuo_local.models.prompt import MAX_IMAGES, Turn
from huatuo_local.runtime.core.items import conversation_items, image_item
from huatuo_local.runtime.core.sampling import SamplingParams
from huatuo_local.runtime.core.scheduler import Job, Scheduler
from huatuo_local.runtime.images.loader import LoadOptions, load_rgb, prepare

RESULTS = "results.jsonl"
RUN = "run.json"
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

    @classmethod
    def release(cls, greedy: bool = False) -> EvalSettings:
        return cls(temperature=0.0) if greedy else cls()

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, repetition_penalty=self.repetition_penalty,
                              max_new_tokens=self.max_new_tokens, top_k=self.top_k, top_p=self.top_p,
                              seed=self.seed)


def row_for(record: Record, output: str, generated: int = 0, finish: str = "stop",
            error: str | None = None) -> dict:
    """One line of results.jsonl: the answer and how the release's scorer reads it."""
    row = {"number": record.number, "dataset": record.dataset, "group": record.group,
           "column": card_column(record.dataset), "output": output, "predicted": predicted_letter(output),
           "right": record.right_letter, "correct": is_correct(record, output), "generated_tokens": generated,
           "finish_reason": finish}
    if error:
        row["error"] = error
    return row


class EvalWorker:
    """A model, its scheduler and `parallel` sequences, answering records."""

    def __init__(self, model: str | Path | None, settings: EvalSettings, parallel: int = 1,
                 threads: int | None = None, n_ctx: int = EVAL_CTX, prefix_cache: bool = True,
                 n_gpu_layers: int | None = None, rpc: str | None = None, tensor_split: list[float] | None = None):
        from huatuo_local.runtime.core.loading import open_model

        self.settings = settings
        self.model, self.engine, cache = open_model(model, n_ctx=n_ctx, threads=threads, n_seq=max(1, parallel),
                                                    prefix_cache=prefix_cache, n_gpu_layers=n_gpu_layers,
                                                    rpc=rpc, tensor_split=tensor_split)
        # Enough waiting work that a slot never idles while the driver prepares the next image.
        self.scheduler = Scheduler(self.engine, cache)
        self.window = 2 * max(1, parallel)

    def _job(self, record: Record, done: queue.Queue) -> Job | None:
        if len(record.images) > MAX_IMAGES:
            done.put((record, None, f"{len(record.images)} images; the release takes at most {MAX_IMAGES}"))
            return None
        try:
            images = [image_item(prepare(load_rgb(p, LoadOptions()), self.engine.vision)) for p in record.images]
        except HuatuoError as exc:  # the release skips an unreadable image; here it is recorded as wrong
            done.put((record, None, str(exc)))
            return None
        items = conversation_items(self.engine.tokenize, [Turn(build_query(record), len(images))], images)
        params = self.settings.sampling()
        rng = np.random.default_rng([self.settings.seed, record.number])
        job = Job(items, params, rng, on_event=lambda ev, r=record: done.put((r, ev, None)))
        try:
            return self.scheduler.submit(job)
        except HuatuoError as exc:  # e.g. more positions than the context holds: that question only
            done.put((record, None, str(exc)))
            return None

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
                if event is not None and event[0] == "piece":
                    continue
                live.pop(record.number, None)
                if error is not None:
                    yield row_for(record, "", error=error)
                elif event[0] == "error":
                    yield row_for(record, "", error=str(event[1]))
                else:
                    result = event[1]
                    yield row_for(record, result.text, len(result.tokens), result.finish_reason)
        finally:
            for job in live.values():
                if job is not None:
                    job.cancel()

    def close(self) -> None:
        self.scheduler.close()
        self.engine.close()


# --- the run folder ---------------------------------------------------------------------


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
    return {
        "data": str(Path(data).resolve()), "data_sha256": sha256_file(Path(data)),
        "model": model.ref, "quant": model.quant,
        "llm_sha256": manifest.llm_sha256 if manifest else "",
        "mmproj_sha256": manifest.mmproj_sha256 if manifest else "",
        "settings": asdict(settings),
    }


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


def select(records: list[Record], datasets: list[str] | None, limit: int | None) -> list[Record]:
    """Records of the chosen datasets (a name, or a model-card column such as MMMU), at most `limit` each."""
    if datasets:
        wanted = {d.strip().lower() for d in datasets if d.strip()}
        known = {r.dataset.lower() for r in records} | {card_column(r.dataset).lower() for r in records}
        unknown = sorted(w for w in wanted if w not in known and not any(k.startswith(w) for k in known))
        if unknown:
            names = sorted({r.dataset for r in records})
            raise HuatuoError(f"no dataset {', '.join(unknown)} in this file; it has {', '.join(names)}")
        records = [r for r in records if r.dataset.lower() in wanted or card_column(r.dataset).lower() in wanted
                   or any(r.dataset.lower().startswith(w) for w in wanted)]
    if limit is not None:
        counts: dict[str, int] = {}
        kept = []
        for r in records:
            if counts.get(r.dataset, 0) < limit:
                counts[r.dataset] = counts.get(r.dataset, 0) + 1
                kept.append(r)
        records = kept
    return records


def answer_locally(worker_factory: Callable[[], EvalWorker], pending: list[Record], results: ResultsFile,
                   on_row: Callable[[dict], None]) -> None:
    worker = worker_factory()
    try:
        stream = worker.answer(pending)
        try:
            for row in stream:
                if results.append(row):
                    on_row(row)
        finally:
            stream.close()
    finally:
        worker.close()


def eprint(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- the command ----------------------------------------------------------------------------


def ray_model(model: str | None, resolved) -> str:
    """What each Ray worker loads: a store name resolves in each machine's own store, a path as given."""
    given = Path(str(model)).expanduser() if model else None
    if given is not None and given.exists():
        return str(given.resolve())
    return resolved.ref


def default_out(ref: str, greedy: bool) -> Path:
    return Path("eval-runs") / (ref.replace(":", "-").replace("/", "-") + ("-greedy" if greedy else ""))


def write_report(out: Path, rows: list[dict], chosen: list[Record], identity: dict, extra: dict,
                 model_name: str) -> str:
    """results.json and results.md from what results.jsonl holds for the chosen records."""
    from huatuo_local.runtime.eval.report import markdown, summarize

    numbers = {r.number for r in chosen}
    mine = [r for r in rows if r["number"] in numbers]
    summary = summarize(mine, len(chosen), model_name)
    md = markdown(summary, f"Eval: {identity['model']} on {Path(identity['data']).name}")
    md += (f"\nModel: {identity['model']} ({identity['quant']}), LLM sha256 {identity['llm_sha256'][:16]}…, "
           f"mmproj sha256 {identity['mmproj_sha256'][:16]}…; engine build {extra['engine'][:16]}…; settings "
           f"{json.dumps(identity['settings'])}.\n")
    write_private(out / "results.json", json.dumps({"summary": summary, "identity": identity, **extra}, indent=2,
                                                   ensure_ascii=False))
    write_private(out / "results.md", md)
    return md


def run(data: Path, model: str | None, out: Path | None = None, datasets: list[str] | None = None,
        limit: int | None = None, parallel: int = 1, greedy: bool = False, ray: str | None = None,
        threads: int | None = None, show_progress: bool = True, workers: int | None = None,
        rpc: str | None = None, tensor_split: list[float] | None = None) -> tuple[Path, str]:
    """Answer what the run in `out` still lacks, then write its report; returns (out, Markdown)."""
    from huatuo_local.models.evaluation import load_records
    from huatuo_local.models.store import resolve
    from huatuo_local.runtime.engine.build import engine_build_id
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    records, dropped = load_records(Path(data))
    chosen = select(records, datasets, limit)
    if not chosen:
        raise HuatuoError(f"{data}: no multiple-choice records to evaluate (dropped: {dropped})")
    resolved = resolve(model)
    settings = EvalSettings.release(greedy)
    identity = run_identity(Path(data), resolved, settings)
    extra = {"engine": engine_build_id(), "dropped": dropped, "datasets": datasets or "all", "limit": limit}
    out = out or default_out(resolved.ref, greedy)
    results = open_run(out, identity, extra)
    pending = [r for r in chosen if r.number not in results.numbers]
    eprint(f"eval: {len(chosen)} questions ({len(chosen) - len(pending)} answered before), results in {out}")
    progress = Progress(TextColumn("answering"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                        console=Console(stderr=True), disable=not show_progress)
    import time

    t0, fresh = time.perf_counter(), [0]
    try:
        with progress:
            task = progress.add_task("answering", total=len(chosen), completed=len(chosen) - len(pending), rate="")

            def on_row(row: dict) -> None:
                fresh[0] += 1
                per_min = 60 * fresh[0] / max(1e-9, time.perf_counter() - t0)
                progress.update(task, advance=1, rate=f"{per_min:.1f} questions/min")

            if pending and ray:
                from huatuo_local.runtime.eval.on_ray import answer_with_ray

                answer_with_ray(ray, ray_model(model, resolved), settings, parallel, threads, pending, results,
                                on_row, workers)
            elif pending:
                answer_locally(lambda: EvalWorker(str(resolved.manifest_path or resolved.llm_path), settings,
                                                  parallel, threads, rpc=rpc, tensor_split=tensor_split),
                               pending, results, on_row)
    finally:
        results.close()
        rows = read_rows(out / RESULTS)
        md = write_report(out, rows, chosen, identity, extra, resolved.name)
    if rows and all(r.get("error") for r in rows):
        first = next(r for r in rows)
        raise HuatuoError(f"none of the {len(rows)} questions could be asked (record {first['number']}: "
                          f"{first['error']}); each is named in {out / RESULTS}")
    return out, md
