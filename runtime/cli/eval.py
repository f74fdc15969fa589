"""`huatuo-local eval`: the model card's accuracy table for your model files, and `eval compare`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from huatuo_local.runtime.cli.app import app, check_settings, fail, interrupted
from huatuo_local.runtime.cli.options import model_options
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.eval.worker import EVAL_CTX


@app.command(name="eval", epilog=(
    "Examples:\n\n"
    "  huatuo-local eval medical_multimodel_evaluation_data.json --model huatuo-vision-7b:q4_k_m\n\n"
    "  huatuo-local eval data.json --model huatuo-vision-7b:q8_0 --datasets VQA-RAD,SLAKE --limit 50 --greedy\n\n"
    "  huatuo-local eval data.json --model /shared/models/huatuo-vision-7b --ray auto --parallel 4\n\n"
    "  huatuo-local eval compare eval-runs/huatuo-vision-7b-q8_0 eval-runs/huatuo-vision-7b-q4_k_m"))
@model_options(defaults={"ctx": EVAL_CTX})
def eval_cmd(
    config: ModelConfig,
    args: Annotated[list[str], typer.Argument(
        metavar="DATA.json | compare RUN_A RUN_B",
        help="The release's evaluation file (medical_multimodel_evaluation_data.json, images beside it), or "
             "`compare` and two run folders.")],
    datasets: Annotated[str | None, typer.Option(help="Comma-separated datasets or model-card columns "
                                                 "(VQA-RAD,SLAKE,PathVQA,PMC-VQA,OmniMedVQA,MMMU); "
                                                 "default: all.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most N questions per dataset (a quick "
                                              "estimate).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder: answers (results.jsonl), results.json, "
                                             "results.md; rerun to continue (default: "
                                             "eval-runs/MODEL-QUANT).")] = None,
    greedy: Annotated[bool, typer.Option(help="Greedy decoding (deterministic) instead of the release's "
                                         "sampling (temperature 0.2, repetition penalty 1.2, seed 42).")] = False,
    ray: Annotated[str | None, typer.Option(help="Spread the questions over a Ray cluster: its ADDRESS, "
                                            "`auto`, or `local` (a private one on this machine); needs "
                                            "huatuo-local[distributed].")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Ray workers (model replicas; default: one per "
                                                "machine).")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="End each answer before this text (repeat for up to 4); "
                                                   "recorded in the run's settings.")] = None,
) -> None:
    """The model card's accuracy table for your model files, measured the way the release measures it."""
    from huatuo_local.runtime.eval import run as evaluate
    from huatuo_local.runtime.eval.results import RESULTS, read_rows

    if args and args[0] == "compare":
        if len(args) != 3:
            fail("usage: huatuo-local eval compare RUN_A RUN_B")
        from huatuo_local.runtime.eval.report import compare, compare_markdown

        rows = []
        for run_dir in args[1:]:
            path = Path(run_dir) / RESULTS
            if not path.is_file():
                fail(f"{run_dir}: no {RESULTS}; give two folders written by huatuo-local eval")
            rows.append(read_rows(path))
        typer.echo(compare_markdown(compare(*rows), args[1], args[2]), nl=False)
        return
    if len(args) != 1:
        fail("give one evaluation file (or: huatuo-local eval compare RUN_A RUN_B)")
    if workers and not ray:
        fail("--workers needs --ray")
    if config.n_gpu_layers is not None and ray:
        fail("--n-gpu-layers applies to this machine's model; with --ray each worker places its own")
    if config.rpc and ray:
        fail("give --ray (a model per machine) or --rpc (one model across machines), not both")
    check_settings(stop=tuple(stop or ()))
    try:
        folder, md = evaluate.run(
            Path(args[0]), config, out, [d for d in datasets.split(",")] if datasets else None, limit, greedy, ray,
            show_progress=sys.stderr.isatty(), workers=workers, stop=tuple(stop or ()))
    except KeyboardInterrupt:
        interrupted("stopped: every answer so far is saved; run the same command again to continue")
    typer.echo(md, nl=False)
    typer.echo(f"(written to {folder}/results.md and results.json)", err=True)
