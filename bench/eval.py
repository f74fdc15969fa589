"""What one evaluation question costs: `huatuo-local eval`'s worker vs llama-mtmd-cli per question.

A synthetic evaluation file in the release's format (random images, 4-option questions) over the
7B's real shapes with random weights (`bench/runtime.py`'s checkpoint at `--depth` layers), answered
greedily with `--tokens` new tokens each (random weights never stop on their own; the release allows
256). Three layouts of the same number of questions: every question on its own image, 4 questions
per image, and 8 per image (VQA-RAD and SLAKE ask several questions about one scan), each with
`--parallel` 1 and 2. The peer is what a user scripting llama.cpp does: one `llama-mtmd-cli` run per
question (load, encode, prefill, answer), measured in the same run on the same files.

    .venv/bin/python bench/eval.py [--depth 4] [--questions 16] [--tokens 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from common import append, invocation, run_measured  # noqa: E402

CHILD = """
import json, time
from pathlib import Path
from huatuo_local.models.evaluation import load_records
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.eval.worker import EvalSettings, EvalWorker
records, _ = load_records(Path({data!r}))
t0 = time.perf_counter()
w = EvalWorker(ModelConfig(model={manifest!r}, parallel={parallel}),
               EvalSettings(temperature=0.0, max_new_tokens={tokens}))
load_s = time.perf_counter() - t0
t0 = time.perf_counter()
rows = list(w.answer(records))
answer_s = time.perf_counter() - t0
assert len(rows) == len(records) and not any(r.get("error") for r in rows), rows[:2]
print(json.dumps(dict(load_s=load_s, answer_s=answer_s, questions=len(rows),
                      tokens=sum(r["generated_tokens"] for r in rows))))
"""


def write_data(folder: Path, questions: int, per_image: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for q in range(questions):
        img = folder / f"img{q // per_image}.png"
        if not img.exists():
            rng = np.random.default_rng(q // per_image)
            Image.fromarray((rng.random((400, 500, 3)) * 255).astype(np.uint8)).save(img)
        records.append({"question": f"Question {q}: which finding is present?",
                        "options": ["nodule", "effusion", "fracture", "normal"], "answer": "normal",
                        "image": [img.name], "dataset": "VQA-RAD"})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def mtmd_cli_per_question(bin_dir: Path, gguf: Path, mmproj: Path, data: Path, tokens: int, threads: int) -> float:
    from huatuo_local.models.evaluation import build_query, load_records

    records, _ = load_records(data)
    t0 = time.perf_counter()
    for r in records:
        cmd = [str(bin_dir / "llama-mtmd-cli"), "-m", str(gguf), "--mmproj", str(mmproj), "--image",
               str(r.images[0]), "-p", build_query(r), "-n", str(tokens), "--temp", "0", "-c", "4096",
               "-t", str(threads), "--ignore-eos"]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=3600,
                              env={"LD_LIBRARY_PATH": str(bin_dir), "PATH": "/usr/bin:/bin"})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-800:])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    args = ap.parse_args()
    from huatuo_local.runtime.system import physical_cores

    import runtime as rb

    if args.tiny:
        rb.tiny_shapes()
    work = args.workdir
    out = rb.converted_pair(work, args.depth, args.quant)
    manifest = out / f"m-{args.quant}.manifest.json"
    layouts = [("every question its own image", 1), ("4 questions per image", 4), ("8 questions per image", 8)]
    rows = ["| layout | contender | seconds per question | questions/min |", "|---|---|---|---|"]
    threads = physical_cores()
    bin_dir = None
    if not args.no_llama_cpp:
        import llama_tools

        bin_dir = llama_tools.bin_folder()
    home = work / "eval-home"
    for label, per_image in layouts:
        data = write_data(work / f"eval-{per_image}", args.questions, per_image)
        for parallel in (1, 2):
            import shutil

            shutil.rmtree(home, ignore_errors=True)  # no prefix cache from an earlier run
            r = run_measured(CHILD.format(data=str(data), manifest=str(manifest), tokens=args.tokens,
                                          parallel=parallel), {"HUATUO_LOCAL_HOME": str(home)})
            print(label, parallel, json.dumps(r), flush=True)
            per_q = r["answer_s"] / r["questions"]
            rows.append(f"| {label} | huatuo-local eval, --parallel {parallel} | {per_q:.2f} s | {60 / per_q:.1f} |")
        if bin_dir is not None and per_image in (1, 8):
            secs = mtmd_cli_per_question(bin_dir, out / f"m-{args.quant}.gguf", out / "mmproj-m-f16.gguf", data,
                                         args.tokens, threads)
            per_q = secs / args.questions
            rows.append(f"| {label} | llama-mtmd-cli, one run per question | {per_q:.2f} s | {60 / per_q:.1f} |")
    notes = (f"{args.questions} questions, {args.quant} LLM with Qwen2-7B shapes at {args.depth} layers, F16 mmproj, "
             f"random weights, greedy, {args.tokens} new tokens per question (`--ignore-eos` for llama-mtmd-cli), "
             f"{threads} threads. Ours: one `EvalWorker` (the model loaded once; load time not counted), a fresh "
             "prefix cache per row; questions about one image reuse its encoded prefix. llama-mtmd-cli: each "
             "question a new process, load included, as a script around it would run.")
    table = "\n".join(rows)
    if args.no_append:
        print(table + "\n\n" + notes)
    else:
        append(f"Eval: cost per question ({args.depth} layers)", f"`{invocation()}`", table, notes)


if __name__ == "__main__":
    main()
