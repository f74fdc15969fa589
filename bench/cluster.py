"""serve --ray beside plain serve, in the same run, on the same files: what replicas add and what Ray costs.

HuatuoGPT-Vision-7B's shapes with random weights (bench/runtime.py's checkpoint: the full CLIP tower, the full
embeddings and head, Qwen2-7B layers at --depth), at --quant, on this machine. Every answer is exactly
--tokens long (`min_tokens`). Measured:

1. Aggregate decode tokens/s, --clients concurrent clients asking --rounds text questions each: plain `serve
   --threads T`, and `serve --ray local` with 1 and with 2 replicas of --threads T each (T = 1 on a 2-core
   machine: two replicas use both cores); and, for reference, one plain process on all cores (--parallel 4).
   Goals: 2 replicas >= 1.8x 1 replica; 1 replica >= 0.9x plain serve.
2. Image follow-ups with 2 replicas: --conversations conversations, each an image question then a follow-up;
   the follow-up's time to first token under affinity routing, under power of two choices with the cluster tier
   (the shared prefix cache), and under power of two choices without it. Goal: affinity >= 5x faster than
   plain power of two choices.

    .venv/bin/python bench/cluster.py [--depth 4] [--quant Q4_K_M] [--threads 1] [--tokens 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from common import append, invocation, write_json  # noqa: E402
from huatuo_local.runtime.system import physical_cores  # noqa: E402
from serve import Server, clients, prepare_model  # noqa: E402  (bench/serve.py)

ALL_CORES = "plain serve, all cores"


def server(name: str, manifest: Path, home: Path, args, *extra: str, parallel: int = 2) -> Server:
    return Server(name, [sys.executable, "-m", "huatuo_local", "serve", "--model", str(manifest), "--port", "PORT",
                         "--parallel", str(parallel), "--threads", str(args.threads), "--ctx", str(args.ctx), *extra],
                  {"HUATUO_LOCAL_HOME": str(home)})


def image_conversation(url: str, image_uri: str, n: int, fixed: dict) -> dict:
    """An image question, then its follow-up; the follow-up's time to first token and who answered."""
    import httpx

    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri}},
                                          {"type": "text", "text": f"Case {n}: what does the picture show?"}]}]
    r = httpx.post(f"{url}/v1/chat/completions", timeout=3600, json={
        "messages": first, "max_tokens": 8, "temperature": 0, **fixed, "min_tokens": 8})
    r.raise_for_status()
    answer = r.json()["choices"][0]["message"]["content"]
    follow = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And its size?"}]
    return streamed_follow_up(url, follow, fixed)


def streamed_follow_up(url: str, messages: list, fixed: dict) -> dict:
    """The follow-up, streamed: its time to first content, and its counters from the usage chunk (which replica
    answered, whether it encoded the image again or read it from the cluster tier)."""
    import json

    import httpx

    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "stream": True, **fixed, "min_tokens": 4,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, counters = None, {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if any((c.get("delta") or {}).get("content") for c in data.get("choices") or []):
                first = first or time.perf_counter()
            counters = data.get("huatuo") or counters
    return {"ttft_s": (first or time.perf_counter()) - t0, "huatuo": counters}


def images(n: int) -> list[str]:
    """n different pictures (one per conversation: none is in any replica's cache beforehand)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(9000 + i)
        buf = io.BytesIO()
        Image.fromarray((rng.random((336, 336, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def follow_ups(srv: Server, uris: list[str], fixed: dict) -> dict:
    runs = [image_conversation(srv.url, u, i, fixed) for i, u in enumerate(uris)]
    ttft = [r["ttft_s"] for r in runs]
    return {"median_ttft_s": statistics.median(ttft), "mean_ttft_s": statistics.mean(ttft),
            "encoded_again": sum(1 for r in runs if r["huatuo"].get("images_encoded")),
            "from_cluster_tier": sum(1 for r in runs if r["huatuo"].get("prefix_cache_hits"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=1, help="threads of plain serve and of each replica")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per answer (fixed)")
    ap.add_argument("--rounds", type=int, default=3, help="questions per client")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--conversations", type=int, default=6, help="image conversations per routing")
    ap.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    args = ap.parse_args()
    manifest, _, _ = prepare_model(args)
    fixed = {"min_tokens": args.tokens}
    results: dict = {}
    ray_args = ("--ray", "local")
    cores = physical_cores()
    for name, extra in (("plain serve", ()), ("ray, 1 replica", (*ray_args, "--replicas", "1")),
                        ("ray, 2 replicas", (*ray_args, "--replicas", "2")),
                        (ALL_CORES, ("--threads", str(cores), "--parallel", "4"))):
        home = Path(tempfile.mkdtemp(prefix="bench-cluster-home-"))
        srv = server(name, manifest, home, args, *extra, "--no-prefix-cache")  # (a later --threads wins)
        try:
            clients(srv.url, 2, 1, args.tokens, fixed)  # warm: both sequences of each replica have run
            results[name] = clients(srv.url, args.clients, args.rounds, args.tokens, fixed)
        finally:
            srv.stop()
            shutil.rmtree(home, ignore_errors=True)
        print(name, results[name], flush=True)
    uris = images(args.conversations)
    for name, extra in (("affinity", ("--routing", "affinity")),
                        ("pow2 + cluster tier", ("--routing", "pow2")),
                        ("pow2, no prefix cache", ("--routing", "pow2", "--no-prefix-cache"))):
        home = Path(tempfile.mkdtemp(prefix="bench-cluster-home-"))
        srv = server(name, manifest, home, args, *ray_args, "--replicas", "2", *extra, parallel=1)
        try:
            results[name] = follow_ups(srv, uris, fixed)
        finally:
            srv.stop()
            shutil.rmtree(home, ignore_errors=True)
        print(name, results[name], flush=True)
    report(results, args)


def report(results: dict, args) -> None:
    plain, one, two, whole = (results[k]["agg_tok_s"] for k in ("plain serve", "ray, 1 replica", "ray, 2 replicas",
                                                                ALL_CORES))
    # Means, not medians: under power of two choices about half the follow-ups land where their image is not,
    # so the median of a handful is a coin toss between the two kinds; the mean is what a user waits on average.
    aff, tier, bare = (results[k]["mean_ttft_s"] for k in ("affinity", "pow2 + cluster tier", "pow2, no prefix cache"))
    rows = ["| server | aggregate tok/s | TTFT p50 / p95 (s) |", "|---|---|---|"]
    for k in ("plain serve", "ray, 1 replica", "ray, 2 replicas", ALL_CORES):
        r = results[k]
        label = f"{k} (--threads {physical_cores()} --parallel 4)" if k == ALL_CORES else k
        rows.append(f"| {label} | {r['agg_tok_s']:.2f} | {r['p50_ttft_s']:.2f} / {r['p95_ttft_s']:.2f} |")
    rows += ["", "| follow-up routing (2 replicas) | TTFT mean / median (s) | images encoded again | read from the "
                 "cluster tier |", "|---|---|---|---|"]
    for k in ("affinity", "pow2 + cluster tier", "pow2, no prefix cache"):
        r = results[k]
        rows.append(f"| {k} | {r['mean_ttft_s']:.3f} / {r['median_ttft_s']:.3f} | {r['encoded_again']} of "
                    f"{args.conversations} | {r['from_cluster_tier']} |")
    ratios = {"two_over_one_replica": two / one, "one_replica_over_plain": one / plain,
              "two_replicas_over_all_cores": two / whole,
              "pow2_over_affinity": bare / aff, "pow2_tier_over_affinity": tier / aff}
    rows += ["", f"- 2 replicas / 1 replica: {ratios['two_over_one_replica']:.2f}x (goal >= 1.8x); 1 replica / plain "
                 f"serve: {ratios['one_replica_over_plain']:.2f}x (goal >= 0.9x); 2 replicas / one process on all "
                 f"cores: {ratios['two_replicas_over_all_cores']:.2f}x.",
             f"- Follow-up TTFT (means), power of two choices / affinity: {ratios['pow2_over_affinity']:.1f}x without "
             f"a prefix cache (goal >= 5x), {ratios['pow2_tier_over_affinity']:.1f}x with the cluster tier."]
    write_json(args.json, {"depth": args.depth, "quant": args.quant, "tokens": args.tokens, "threads": args.threads,
                           "clients": args.clients, "results": results, "ratios": ratios})
    text = "\n".join(rows)
    if args.no_append:
        print(text)
        return
    append(f"Cluster: serve --ray local beside plain serve, {args.depth}-layer 7B shapes at {args.quant}, "
           f"{args.tokens}-token answers, {args.threads} thread(s) each", invocation(), text,
           f"{args.clients} clients x {args.rounds} text questions, `--parallel 2` per server or replica, no prefix "
           "cache for the throughput rows. Follow-ups: one new picture per conversation, `--parallel 1` per replica, "
           "the follow-up's time to first token measured by streaming it. Aggregate decode tokens/s: every "
           "client's tokens after its first, over the time from the first client's first token to the last "
           "client's last.")


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
