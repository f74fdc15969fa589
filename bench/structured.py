"""Structured answers: what enforcing a JSON schema costs per token, ours (llguidance's mask before the release's
sampling) beside llama-server's `json_schema` (its own GBNF grammar) on the same files and schema.

    .venv/bin/python bench/structured.py --depth 4          (7B shapes at 4 layers, the real 152,064-token vocabulary)

Both servers answer the same text question greedily, `--tokens` new tokens, without and with the schema; the
decode rate is tokens after the first over the time from the first to the last (ours: `huatuo.generation_s`;
llama-server: its `timings`). Separately, in one process: building the schema engine's view of the vocabulary
(once per model) and the mask alone per token (compute the allowed set, apply it to the 152,064 scores).
Appends to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from common import append, invocation, run_measured  # noqa: E402
from serve import Server  # noqa: E402

from runtime import converted_pair, tiny_shapes  # noqa: E402

# A report whose text field is long enough that neither side finishes before --tokens.
SCHEMA = {"type": "object", "properties": {
    "modality": {"enum": ["CT", "MR", "X-ray"]}, "urgent": {"type": "boolean"},
    "report": {"type": "string"}}, "required": ["modality", "urgent", "report"], "additionalProperties": False}
QUESTION = "Write the radiology report for this chest CT as JSON."

MASK = """
import json, time
import numpy as np
from huatuo_local.runtime.engine.engine import Engine, EngineOptions
from huatuo_local.runtime.core.structured import Constraint, Grammar, ll_tokenizer
eng = Engine({llm!r}, {mmproj!r}, EngineOptions(n_ctx=256))
t0 = time.perf_counter()
ll_tokenizer(eng.tokenizer, eng.eos_id)
build_s = time.perf_counter() - t0
c = Constraint(Grammar.json_schema(json.loads({schema!r})), eng.tokenizer, eng.eos_id)
rng = np.random.default_rng(0)
times = []
for _ in range({tokens}):
    logits = rng.standard_normal(eng.n_vocab).astype(np.float32)
    t = time.perf_counter()
    c.mask(logits)
    times.append(time.perf_counter() - t)
    if not c.accept(int(np.argmax(logits))) or c.complete:
        break
print(json.dumps(dict(build_s=build_s, mask_ms=1e3 * float(np.median(times)), steps=len(times))))
"""


def _ask(url: str, tokens: int, schema: dict | None, full_length: dict) -> dict:
    """One greedy request; with `schema` the answer is constrained, else `full_length` keeps it to `tokens`."""
    import httpx

    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens, "temperature": 0}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "report", "schema": schema}}
    else:
        body.update(full_length)
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=3600).json()


def ours_rate(url: str, tokens: int, schema: dict | None) -> float:
    r = _ask(url, tokens, schema, {"min_tokens": tokens})
    return (r["usage"]["completion_tokens"] - 1) / r["huatuo"]["generation_s"]


def theirs_rate(url: str, tokens: int, schema: dict | None) -> float:
    r = _ask(url, tokens, schema, {"ignore_eos": True})
    return float(r["timings"]["predicted_per_second"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    args = ap.parse_args()
    if args.tiny:
        tiny_shapes()
    out = converted_pair(args.workdir, args.depth, args.quant)
    manifest = out / f"m-{args.quant}.manifest.json"
    llm, mmproj = out / f"m-{args.quant}.gguf", out / "mmproj-m-f16.gguf"
    mask = run_measured(MASK.format(llm=str(llm), mmproj=str(mmproj), schema=json.dumps(SCHEMA), tokens=args.tokens))
    print("mask", json.dumps(mask), flush=True)
    home = Path(tempfile.mkdtemp(prefix="bench-structured-home-"))
    rows = []
    try:
        ours = Server("huatuo-local", [sys.executable, "-m", "huatuo_local", "serve", "--model", str(manifest),
                                       "--port", "PORT", "--threads", str(args.threads), "--no-prefix-cache",
                                       "--ctx", "2048", "-ngl", "0"], {"HUATUO_LOCAL_HOME": str(home)})
        try:
            ours_rate(ours.url, 8, SCHEMA)  # the schema engine's vocabulary is built on the first request
            free, shaped = ours_rate(ours.url, args.tokens, None), ours_rate(ours.url, args.tokens, SCHEMA)
        finally:
            ours.stop()
        rows.append(("huatuo-local (llguidance mask)", free, shaped))
        try:
            import llama_tools

            bin_dir = llama_tools.bin_folder()
            theirs = Server("llama-server", [str(bin_dir / "llama-server"), "-m", str(llm), "-c", "2048", "-t",
                                             str(args.threads), "--host", "127.0.0.1", "--port", "PORT", "-ngl", "0",
                                             "--jinja"], {"LD_LIBRARY_PATH": str(bin_dir)})
            try:
                theirs_rate(theirs.url, 8, SCHEMA)
                rows.append(("llama-server (json_schema → GBNF)", theirs_rate(theirs.url, args.tokens, None),
                             theirs_rate(theirs.url, args.tokens, SCHEMA)))
            finally:
                theirs.stop()
        except Exception as exc:  # our figures stand without theirs
            print(f"llama-server skipped: {exc}")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    table = "\n".join(["| server | decode tok/s, free text | with the schema | cost of the schema |",
                       "|---|---|---|---|"]
                      + [f"| {name} | {a:.1f} | {b:.1f} | {100 * (1 - b / a):+.1f} % |" for name, a, b in rows]
                      + ["", f"Mask alone (ours, one process): {mask['mask_ms']:.3f} ms per token (median of "
                             f"{mask['steps']}: compute the allowed tokens, apply them to the scores); the vocabulary "
                             f"view built once per model in {mask['build_s']:.2f} s."])
    print(table)
    if not args.no_append:
        append(f"Structured answers: a JSON schema's cost per token ({args.depth}-layer 7B shapes, {args.quant})",
               invocation(), table,
               f"Random weights with the real Qwen2 vocabulary (152,064 tokens), greedy, {args.tokens} new tokens, "
               f"{args.threads} threads, CPU, text-only question. Free text is forced to full length (ours "
               "min_tokens, llama-server ignore_eos); with the schema both stop when the document is complete, "
               "which the long `report` string keeps from happening before the limit. Schema: "
               f"`{json.dumps(SCHEMA)}`.")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"bench/structured.py: {time.time() - t0:.0f} s")
