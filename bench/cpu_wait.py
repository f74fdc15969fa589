"""Decode on a busy CPU: how long llama.cpp's idle OpenMP threads spin, and what it costs.

llama.cpp's CPU backend waits at an OpenMP barrier between graph operations. libgomp spins there
300,000 iterations before sleeping, or 100 when the process has more OpenMP threads than CPUs — which
an answer has after its image was encoded on the encoder thread (a second team), and not after its
image came from the prefix cache. huatuo-local loads libgomp with a bounded spin
(`src/huatuo_local/native.py`). This measures, per spin setting, an answer's decode after a prefix-cache
hit and after a miss, on a quiet machine and with one busy loop per core, as tokens/s and CPU time per
token; llama-bench's tg (libgomp's defaults, one team) runs beside it in the same conditions.

    .venv/bin/python bench/cpu_wait.py [--depth 4] [--quant Q4_K_M] [--gen 32] [--rounds 2] [--tiny]
        [--loads quiet busy] [--paths hit miss]

`--loads quiet --paths hit --depth 28` measures the spin's cost where it is largest (one OpenMP team, a
token's graph at full depth) in minutes.

Uses bench/runtime.py's checkpoint of the 7B's real shapes (random weights) at `--depth` layers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from common import append, invocation, machine, run_measured, versions  # noqa: E402

# (label, environment): libgomp's own defaults, the engine's setting, a longer spin, never spin
SETTINGS = [
    ("libgomp default (300000)", {"HUATUO_LOCAL_OPENMP_SPIN": "default"}),
    ("spin 1000 (huatuo-local)", {}),
    ("spin 100", {"HUATUO_LOCAL_OPENMP_SPIN": "100"}),
    ("spin 10000", {"HUATUO_LOCAL_OPENMP_SPIN": "10000"}),
    ("passive", {"OMP_WAIT_POLICY": "passive"}),
]

CHILD = """
import json, time
from huatuo_local import HuatuoChatbot
bot = HuatuoChatbot({manifest!r}, temperature=0, max_new_tokens={gen}, threads={threads},
                    prefix_cache={cache})
bot.sampling.min_new_tokens = {gen}  # random weights: a fixed number of tokens
marks = []
def hook(logits):
    marks.append(time.process_time())  # CPU of every thread of this process
bot.session.logit_hook = hook
bot.chat("What does this image show?", [{image!r}])
r = bot.last_reply
cpu = time.process_time() - marks[1]
print(json.dumps({{"hits": r.counters.prefix_cache_hits, "tokens": len(r.tokens), "gen_s": r.timings.generation_s,
                  "cpu_per_token_ms": 1000 * cpu / (len(r.tokens) - 1)}}))
"""


def hogs(n: int) -> list[subprocess.Popen]:
    """One busy loop per core, each ending by itself after 20 minutes if nobody stops it."""
    code = "import time\nend = time.time() + 1200\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def ours(manifest: Path, image: Path, home: Path, env: dict, hit: bool, gen: int, threads: int,
         check: bool = True) -> dict:
    code = CHILD.format(manifest=str(manifest), gen=gen, threads=threads, cache=hit, image=str(image))
    out = run_measured(code, dict(env, HUATUO_LOCAL_HOME=str(home)))
    assert not check or out["hits"] == (1 if hit else 0), out
    out["tok_s"] = (out["tokens"] - 1) / out["gen_s"] if out["gen_s"] else 0.0
    return out


def peer(bin_dir: Path | None, gguf: Path, threads: int, gen: int) -> dict:
    if bin_dir is None:
        return {}
    import llama_tools

    rows = json.loads(llama_tools.run_tool(bin_dir, "llama-bench", "-m", str(gguf), "-p", "0", "-n", str(gen),
                                           "-r", "2", "-t", str(threads), "-o", "json").stdout)
    return {"tok_s": float(rows[0]["avg_ts"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--only", nargs="+", help="measure only the settings whose labels start with these")
    ap.add_argument("--loads", nargs="+", choices=["quiet", "busy"], default=["quiet", "busy"])
    ap.add_argument("--paths", nargs="+", choices=["hit", "miss"], default=["hit", "miss"])
    args = ap.parse_args()
    settings = [s for s in SETTINGS if not args.only or s[0].startswith(tuple(args.only))]
    import runtime

    if args.tiny:
        runtime.tiny_shapes()
        args.workdir = args.workdir.with_name(args.workdir.name + "-tiny")
    image = runtime.write_image(args.workdir)
    folder = runtime.converted_pair(args.workdir, args.depth, args.quant)
    manifest, gguf = folder / f"m-{args.quant}.manifest.json", folder / f"m-{args.quant}.gguf"
    home = args.workdir / "home-cpu-wait"
    shutil.rmtree(home, ignore_errors=True)
    ours(manifest, image, home, {}, True, 2, args.threads, check=False)  # puts the image's prefix in the cache
    try:
        import llama_tools

        bin_dir = llama_tools.bin_folder()
    except (Exception, SystemExit) as exc:  # our own figures stand without the peer's
        print(f"llama-bench skipped: {exc}")
        bin_dir = None
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for load in args.loads:
            busy = hogs(os.cpu_count() or 2) if load == "busy" else []
            try:
                for label, env in settings:
                    for path, hit in (("cache hit", True), ("cache miss", False)):
                        if path.split()[1] not in args.paths:
                            continue
                        r = ours(manifest, image, home, env, hit, args.gen, args.threads)
                        rows.setdefault((label, path, load), []).append(r)
                        print(label, path, load, json.dumps(r), flush=True)
                r = peer(bin_dir, gguf, args.threads, args.gen)
                if r:
                    rows.setdefault(("llama-bench tg (libgomp default)", "-", load), []).append(r)
                    print("llama-bench", load, r, flush=True)
            finally:
                stop(busy)
    table = ["| setting | path | " + " | ".join(f"{load}: tok/s | {load}: CPU ms/token" for load in args.loads) + " |",
             "|---|---|" + "---|---|" * len(args.loads)]
    for label, path in dict.fromkeys((k[0], k[1]) for k in rows):
        cells = []
        for load in args.loads:
            runs = rows.get((label, path, load), [])
            tok = statistics.median(r["tok_s"] for r in runs) if runs else 0.0
            cpu = [r["cpu_per_token_ms"] for r in runs if "cpu_per_token_ms" in r]
            cells += [f"{tok:.1f}", f"{statistics.median(cpu):.1f}" if cpu else "–"]
        table.append(f"| {label} | {path} | " + " | ".join(cells) + " |")
    notes = (f"Machine: {machine()}. {versions()}. 7B shapes at {args.depth} layers, {args.quant}, "
             f"{args.gen} tokens after an image, {args.threads} threads, medians of {args.rounds} rounds; "
             "busy: one `while True` loop per core beside the run. CPU per token counts every thread of the "
             "process from the second generated token to the last.")
    print("\n".join(table))
    if not args.no_append:
        append("Decode on a busy CPU: OpenMP spin before sleep", invocation(), "\n".join(table), notes)


if __name__ == "__main__":
    main()
