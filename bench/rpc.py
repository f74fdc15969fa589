"""What splitting the model over llama.cpp RPC workers costs: all local vs one or two local workers.

Uses `bench/runtime.py`'s checkpoint (Qwen2-7B shapes, random weights, `--depth` layers) at `--quant`.
Workers are `huatuo-local rpc-worker` processes on this machine, so the split is pure overhead here
(same CPU, extra copies, loopback); what a real network adds is estimated from the bytes and packets
that cross the loopback interface per decoded token (measured, psutil), at 1 Gbit/s and 0.3 ms per
round trip. Each layout runs in a fresh client process; the image turn's time to first token and the
decode rate are the best of `--rounds`.

    .venv/bin/python bench/rpc.py [--depth 4] [--quant Q4_K_M] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from common import append, free_port, invocation, run_measured  # noqa: E402

CHILD = """
import json, time
import psutil
from huatuo_local.runtime.engine.engine import Engine, EngineOptions
from huatuo_local.runtime.images.loader import load_rgb, prepare
rpc = tuple(x for x in {rpc!r}.split(",") if x)
t0 = time.perf_counter()
eng = Engine({llm!r}, {mmproj!r}, EngineOptions(n_ctx=2048, rpc=rpc, tensor_split={split!r},
                                                 rpc_output_local={local!r}, rpc_key_file={key!r}))
load = time.perf_counter() - t0
pic = prepare(load_rgb({image!r}), eng.vision)
tokenize = eng.tokenizer.tokenize
pre, question = tokenize("<|user|>\\n"), tokenize("\\nWhat does the picture show?\\n<|assistant|>\\n")
n = eng.image_tokens


def tokens(seq, start):
    eng.decode_tokens([(0, t, start + k, k == len(seq) - 1) for k, t in enumerate(seq)])
    return start + len(seq)


eng.seq_rm(0, 0)
t0 = time.perf_counter()
pos = tokens(pre, 0)
embd = eng.image_embeddings(pic)
for i in range(0, n, eng.options.ubatch):
    eng.decode_embeddings(0, embd[i:i + eng.options.ubatch], pos + i)
pos = tokens(question, pos + n)
eng.logits_at(len(question) - 1)
ttft = time.perf_counter() - t0
lo0 = psutil.net_io_counters(pernic=True).get("lo")
t0 = time.perf_counter()
for tok in range(1000, 1032):
    pos = tokens([tok], pos)
    eng.logits_at(0)
decode = (time.perf_counter() - t0) / 32
lo1 = psutil.net_io_counters(pernic=True).get("lo")
moved = (lo1.bytes_sent - lo0.bytes_sent) / 32 if lo0 else 0
packets = (lo1.packets_sent - lo0.packets_sent) / 32 if lo0 else 0
# Both hops cross the loopback interface: llama.cpp to this process's relay (runtime/rpc/relay.py), and the
# relay to the worker; only the second would cross a network.
print(json.dumps(dict(load_s=load, ttft_s=ttft, decode_s=decode, bytes_per_token=moved / (2 if rpc else 1),
                      packets_per_token=packets / (2 if rpc else 1), layers_on_workers=eng.rpc_layers)))
eng.close()
"""

LAYOUTS = [  # (label, workers, tensor split, LM head kept here, with a key: TLS)
    ("all on this machine", 0, None, True, False),
    ("half the layers on 1 worker", 1, (1.0, 1.0), True, False),
    ("half the layers on 1 worker, with a key (TLS)", 1, (1.0, 1.0), True, True),
    ("half the layers on 1 worker, LM head there too (llama.cpp's default)", 1, (1.0, 1.0), False, False),
    ("a third here, a third on each of 2 workers", 2, (1.0, 1.0, 1.0), True, False),
    ("all layers on 2 workers", 2, (0.0, 1.0, 1.0), True, False),
    ("all layers on 2 workers, with a key (TLS)", 2, (0.0, 1.0, 1.0), True, True),
]


def start_workers(n: int, threads: int, key: Path | None = None) -> list[tuple[subprocess.Popen, int]]:
    exe = Path(sys.executable).with_name("huatuo-local")
    out = []
    for _ in range(n):
        port = free_port()
        proc = subprocess.Popen([str(exe), "rpc-worker", "--port", str(port), "--threads", str(threads),
                                 *(["--key-file", str(key)] if key else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = proc.stdout.readline() if proc.stdout else ""
        if "listening" not in line:
            raise RuntimeError(f"rpc-worker did not start: {line}")
        out.append((proc, port))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    args = ap.parse_args()
    from huatuo_local.runtime.system import physical_cores

    import runtime as rb

    if args.tiny:
        rb.tiny_shapes()
    work = args.workdir
    image = rb.write_image(work)
    out = rb.converted_pair(work, args.depth, args.quant)
    llm, mmproj = str(out / f"m-{args.quant}.gguf"), str(out / "mmproj-m-f16.gguf")
    threads = physical_cores()
    key = work / "rpc.key"
    if not key.exists():
        from huatuo_local.runtime.rpc.channel import make_key

        make_key(key)
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for label, n, split, local, keyed in LAYOUTS:
            workers = start_workers(n, threads, key if keyed else None)
            try:
                rpc = ",".join(f"127.0.0.1:{port}" for _, port in workers)
                r = run_measured(CHILD.format(rpc=rpc, split=split, local=local, llm=llm, mmproj=mmproj,
                                              image=str(image), key=str(key) if keyed else None))
            finally:
                for proc, _ in workers:
                    proc.terminate()
                    proc.wait(timeout=10)
            print(label, json.dumps(r), flush=True)
            keep = best.setdefault(label, r)
            for k, v in r.items():
                if k.endswith("_s"):
                    keep[k] = min(keep[k], v)
    rows = ["| layout | layers on workers | load | image turn: time to first token | decode tok/s | bytes per "
            "token over the wire | packets per token | + per token on 1 Gbit/s, 0.3 ms round trips (estimate) |",
            "|---|---|---|---|---|---|---|---|"]
    for label, *_ in LAYOUTS:
        r = best[label]
        wire = r["bytes_per_token"] / 125e6 + (r["packets_per_token"] / 2) * 0.3e-3
        rows.append(f"| {label} | {r['layers_on_workers']} | {r['load_s']:.2f} s | {r['ttft_s']:.2f} s | "
                    f"{1 / r['decode_s']:.2f} | "
                    f"{r['bytes_per_token'] / 1024:.1f} KiB | {r['packets_per_token']:.0f} | "
                    f"{'–' if not r['layers_on_workers'] else f'+{wire * 1000:.1f} ms'} |")
    notes = (f"{args.quant} LLM with Qwen2-7B shapes at {args.depth} layers, F16 mmproj (always on this machine), "
             f"random weights, {threads} threads for the client and for each worker, all on this one machine, "
             f"best of {args.rounds} rounds. Workers here compete with the client for the same cores, so the split "
             "is pure overhead on one machine; across machines each adds its own cores and memory. llama.cpp reaches "
             "each worker through this process's relay (bounds and deadlines on every answer), and with a key "
             "over TLS 1.3 to the worker's front. Bytes and packets: loopback traffic per decoded token (both "
             "directions, from psutil, halved: both hops, llama.cpp to the relay and the relay to the worker, cross "
             "the loopback interface), idle machine. The "
             "estimate charges the bytes at 125 MB/s and one 0.3 ms round trip per two packets (request and "
             "answer); a real network's latency dominates it.")
    table = "\n".join(rows)
    if args.no_append:
        print(table + "\n\n" + notes)
    else:
        append(f"RPC: the model split over llama.cpp RPC workers ({args.depth} layers)", f"`{invocation()}`",
               table, notes)


if __name__ == "__main__":
    main()
