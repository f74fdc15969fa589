"""`huatuo-local eval`, the driver: the release's benchmark questions through the scheduler, resumable.

It selects the questions, answers what the run folder (results.py) still lacks with one worker
(worker.py) here or one per Ray actor (on_ray.py), appending each answer as it arrives, and writes
the report (report.py).

Sampling: the release's settings (temperature 0.2, repetition penalty 1.2, 256 new tokens, seed
42). The release seeds once and lets the random stream run through the questions in order, which
no parallel or resumed run can follow; here each question draws from its own stream, seeded from
42 and its record number, so an answer does not depend on order, batching or machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.evaluation import Record, card_column
from huatuo_local.models.private import write_private
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.eval.results import RESULTS, ResultsFile, eprint, open_run, read_rows, run_identity
from huatuo_local.runtime.eval.worker import EvalSettings, EvalWorker


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
    if summary.get("options"):
        from huatuo_local.runtime.eval.calibration import write_diagram

        write_diagram(out / "reliability.png", summary["options"], f"{identity['model']}: reliability")
    return md


def run(data: Path, config: ModelConfig, out: Path | None = None, datasets: list[str] | None = None,
        limit: int | None = None, greedy: bool = False, ray: str | None = None, show_progress: bool = True,
        workers: int | None = None, stop: tuple[str, ...] = ()) -> tuple[Path, str]:
    """Answer what the run in `out` still lacks, then write its report; returns (out, Markdown)."""
    from datetime import datetime, timezone

    from huatuo_local.models.evaluation import load_records
    from huatuo_local.models.notice import NOTICE
    from huatuo_local.models.store import resolve
    from huatuo_local.runtime.core.record import software_versions
    from huatuo_local.runtime.engine.build import engine_build_id
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    records, dropped = load_records(Path(data))
    chosen = select(records, datasets, limit)
    if not chosen:
        raise HuatuoError(f"{data}: no multiple-choice records to evaluate (dropped: {dropped})")
    model = config.model
    resolved = resolve(model)
    settings = EvalSettings.release(greedy, stop)
    identity = run_identity(Path(data), resolved, settings)
    extra = {"engine": engine_build_id(), "dropped": dropped, "datasets": datasets or "all", "limit": limit,
             "software": software_versions(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "notice": NOTICE}
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

                answer_with_ray(ray, config.with_(model=ray_model(model, resolved)), settings, pending, results,
                                on_row, workers)
            elif pending:
                here = config.with_(model=str(resolved.manifest_path or resolved.llm_path))
                answer_locally(lambda: EvalWorker(here, settings), pending, results, on_row)
    finally:
        results.close()
        rows = read_rows(out / RESULTS)
        md = write_report(out, rows, chosen, identity, extra, resolved.name)
    if rows and all(r.get("error") for r in rows):
        first = next(r for r in rows)
        raise HuatuoError(f"none of the {len(rows)} questions could be asked (record {first['number']}: "
                          f"{first['error']}); each is named in {out / RESULTS}")
    return out, md
