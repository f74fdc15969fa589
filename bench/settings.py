"""Engine settings sweep: what micro-batch size, flash attention and threads do to an image turn.

Uses a checkpoint `bench/runtime.py` wrote (real shapes, random weights; `--depth` layers), converted
to `--quant`. Each setting runs in a fresh process; settings are interleaved over `--rounds` rounds
because this machine's speed drifts, and the best round of each is reported. Per setting: the CLIP
encode, the prefill of the 576 image embeddings (libmtmd's decode helper, timed apart from the
encode), a 576-token text prefill, and decode; the image turn's time to first token is
encode + image prefill + the question's tokens. The first row is the engine's default.

    .venv/bin/python bench/settings.py [--depth 4] [--quant Q4_K_M] [--rounds 2]

`--load` measures model loading instead: each load mode (`EngineOptions.load`) in a fresh process
(load time, CPU time, peak anonymous and file-backed memory sampled every 10 ms, and the first decode
after it, which touches every weight), then a whole one-shot `huatuo-local chat IMAGE -p ...
--max-tokens 16` against `llama-mtmd-cli` on the same files. Use `--depth 28` for the 7B's full depth;
`--shape 34b` for Yi-1.5-34B's layer shapes (at the depth given).

    .venv/bin/python bench/settings.py --load --depth 28 [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from common import append, invocation, run_measured  # noqa: E402

# (label, EngineOptions fields (or "quant": another weight type), libmtmd flash attention: None = its
# default, else on/off)
SETTINGS: list[tuple[str, dict, bool | None]] = [
    ("default", {}, None),
    ("flash attention on", {"flash_attn": True}, None),
    ("ubatch 128", {"n_ubatch": 128}, None),
    ("ubatch 256", {"n_ubatch": 256}, None),
    ("ubatch 512", {"n_ubatch": 512}, None),
    ("ubatch 1024", {"n_ubatch": 1024}, None),
    ("encoder flash attention off", {}, False),
    ("1 thread", {"n_threads": 1}, None),
    ("weights read, not mapped", {"load": "read"}, None),
    # Q4_0 has simpler CPU kernels than Q4_K; FIDELITY.md ranks its quality below Q4_K_M's
    ("Q4_0 weights", {"quant": "Q4_0"}, None),
]

CHILD = """
import ctypes, json, time
import numpy as np
from huatuo_local.runtime.engine import engine as E
from huatuo_local.runtime.images.loader import load_rgb, prepare
from huatuo_local.runtime.llama.bindings import mtmd as mtmd_lib
VISION_FA = {vision_fa!r}
if VISION_FA is not None:
    mtmd = mtmd_lib()
    default = mtmd.mtmd_context_params_default
    def patched():
        p = default(); p.flash_attn_type = 1 if VISION_FA else 0; return p
    mtmd.mtmd_context_params_default = patched
opts = E.EngineOptions(n_ctx=2048, **{options!r})
t0 = time.perf_counter()
eng = E.Engine({llm!r}, {mmproj!r}, opts)
load_s = time.perf_counter() - t0
pic = prepare(load_rgb({image!r}), eng.vision)
tokenize = eng.tokenizer.tokenize
prefix, question = tokenize("<|user|>\\n"), tokenize("\\nWhat does the picture show?\\n<|assistant|>\\n")
out = dict(load_s=load_s, encode_s=1e9, image_prefill_s=1e9, question_s=1e9, text_prefill_s=1e9, decode_s=1e9)
n = eng.image_tokens
ub = opts.ubatch


def tokens(seq_tokens, start, logits_last=True):
    # The engine's batched decode, in n_batch pieces, as the scheduler feeds a sequence alone.
    for i in range(0, len(seq_tokens), opts.n_batch):
        part = seq_tokens[i:i + opts.n_batch]
        last = i + len(part) == len(seq_tokens)
        eng.decode_tokens([(0, t, start + i + k, logits_last and last and k == len(part) - 1)
                           for k, t in enumerate(part)])
    return start + len(seq_tokens)


for _ in range(2):
    eng.seq_rm(0, 0)
    pos = tokens(prefix, 0, logits_last=False)
    t0 = time.perf_counter(); embd = eng.image_embeddings(pic)
    out["encode_s"] = min(out["encode_s"], time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, n, ub):
        eng.decode_embeddings(0, embd[i:i + ub], pos + i)
    out["image_prefill_s"] = min(out["image_prefill_s"], time.perf_counter() - t0)
    pos += n
    t0 = time.perf_counter(); pos = tokens(question, pos); eng.logits_at(len(question) - 1)
    out["question_s"] = min(out["question_s"], time.perf_counter() - t0)
    t0 = time.perf_counter()
    for tok in range(1000, 1016):
        pos = tokens([tok], pos); eng.logits_at(0)
    out["decode_s"] = min(out["decode_s"], (time.perf_counter() - t0) / 16)
    eng.seq_rm(0, 0)
    text = [int(t) for t in np.random.default_rng(0).integers(1000, 100000, n)]
    t0 = time.perf_counter(); tokens(text, 0); eng.logits_at((len(text) - 1) % opts.n_batch)
    out["text_prefill_s"] = min(out["text_prefill_s"], time.perf_counter() - t0)
out.update(positions=n, question_tokens=len(question))
eng.close()
print(json.dumps(out))
"""


LOAD_CHILD = """
import json, resource, threading, time
from huatuo_local.runtime.engine import engine as E


def mem():
    d = {{}}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon:", "RssFile:")):
            k, v = line.split(":")
            d[k] = int(v.split()[0]) * 1024
    return d["RssAnon"], d["RssFile"]


peak = [0, 0]
stop = False


def watch():
    while not stop:
        a, f = mem()
        peak[0], peak[1] = max(peak[0], a), max(peak[1], f)
        time.sleep(0.01)


th = threading.Thread(target=watch, daemon=True)
th.start()
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
eng = E.Engine({llm!r}, {mmproj!r}, E.EngineOptions(n_ctx=1024, load={load!r}))
out = dict(load_s=time.perf_counter() - t0)
r1 = resource.getrusage(resource.RUSAGE_SELF)
out.update(user_s=r1.ru_utime - r0.ru_utime, sys_s=r1.ru_stime - r0.ru_stime)
out["anon_loaded"], out["file_loaded"] = mem()
toks = eng.tokenizer.tokenize("The chest radiograph shows " * 8)
t0 = time.perf_counter()
eng.decode_tokens([(0, t, i, i == len(toks) - 1) for i, t in enumerate(toks)])
eng.logits_at(len(toks) - 1)
out["first_decode_s"] = time.perf_counter() - t0
out["anon_after"], out["file_after"] = mem()
stop = True
th.join()
out["peak_anon"], out["peak_file"] = peak
print(json.dumps(out))
"""
LOAD_MODES = ["read", "mmap", "mmap-release"]


def wall_and_peak(cmd: list[str], env: dict | None = None, keep_log: bool = False):
    """A command's wall time and peak RSS in GiB, quiet (with `keep_log`: also its standard error and when
    the first text of its answer reached standard output, in seconds from the start).

    The peak is the child's own VmHWM, polled from /proc while it runs: ru_maxrss from wait4 would
    start from this (forking) process's peak, which a conversion run in this process makes large.
    """
    import os
    import subprocess
    import tempfile
    import threading
    import time

    log = tempfile.TemporaryFile()  # not a pipe: llama.cpp's log would fill it and stall the child
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if keep_log else subprocess.DEVNULL, stderr=log,
                            env=dict(os.environ, **(env or {})))
    first_out = [float("nan")]

    def read_answer() -> None:  # the answer is streamed: its first visible byte is the first token's arrival
        while chunk := proc.stdout.read1(4096):
            if first_out[0] != first_out[0] and chunk.strip():
                first_out[0] = time.perf_counter() - t0

    reader = threading.Thread(target=read_answer, daemon=True) if keep_log else None
    if reader is not None:
        reader.start()
    hwm = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if reader is not None:
        reader.join(5)
    log.seek(0)
    err = log.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err[-800:]}")
    return (wall, hwm / 1024**2, err, first_out[0]) if keep_log else (wall, hwm / 1024**2)


def our_phases(log: str) -> dict[str, float]:
    """`trace PHASE SECONDS` lines (HUATUO_LOCAL_TRACE=1, runtime/trace.py): when each phase ended."""
    import re

    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^trace (.+) ([0-9.]+)$", log, re.M)}


def their_phases(log: str) -> dict[str, float]:
    """When llama-mtmd-cli's phases ended, from the timestamps its log lines carry (minutes.seconds.ms.us
    since it started): the LLM and its context ready (its thread pool made), the projector loaded (it
    prints the chat template next), the image encoded; and the encode's own duration."""
    import re

    out = {}
    for key, pattern in (("LLM loaded, context created", r"llama threadpool init"),
                         ("projector loaded", r"chat template example"),
                         ("image encode started", r"encoding mtmd batch"),
                         ("image encoded", r"mtmd batch encoding done")):
        m = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) \w [^\n]*" + pattern, log, re.M)
        if m:
            mins, secs, ms, us = (int(x) for x in m.groups())
            out[key] = mins * 60 + secs + ms / 1e3 + us / 1e6
    m = re.search(r"mtmd batch encoding done in (\d+) ms", log)
    if m:
        out["(image encode took)"] = int(m.group(1)) / 1000
    return out


def bench_load(args, out: Path, image: Path) -> None:
    import os

    from llama_tools import bin_folder


    llm, mmproj = out / f"m-{args.quant}.gguf", out / "mmproj-m-f16.gguf"
    best: dict[str, dict] = {}
    for _ in range(0 if args.only_e2e else args.rounds):
        for mode in LOAD_MODES:
            r = run_measured(LOAD_CHILD.format(llm=str(llm), mmproj=str(mmproj), load=mode))
            print(mode, json.dumps(r), flush=True)
            keep = best.setdefault(mode, r)
            for k, v in r.items():
                keep[k] = min(keep[k], v) if k.endswith("_s") else max(keep[k], v)
    gib = 1024**3
    rows = ["| load mode | load | CPU user / kernel | peak anonymous | peak file-backed | peak total (VmHWM) | "
            "after first decode (anon + file) | first decode (64 tokens) |", "|---|---|---|---|---|---|---|---|"]
    for mode in LOAD_MODES if best else []:
        r = best[mode]
        rows.append(f"| {mode}{' (default)' if mode == 'mmap-release' else ''} | {r['load_s']:.2f} s | "
                    f"{r['user_s']:.1f} / {r['sys_s']:.1f} s | {r['peak_anon'] / gib:.2f} GiB | "
                    f"{r['peak_file'] / gib:.2f} GiB | {r['peak_rss_kib'] / 1024**2:.2f} GiB | "
                    f"{r['anon_after'] / gib:.2f} + {r['file_after'] / gib:.2f} "
                    f"GiB | {r['first_decode_s']:.2f} s |")
    # The whole one-shot run, as a new user starts it, against llama.cpp's own tool on the same files.
    bins = None if args.no_llama_cpp else bin_folder()
    question = "What does the picture show?"
    ours_cmd = [str(Path(sys.executable).with_name("huatuo-local")), "chat", str(image), "-p", question,
                "--model", str(out / f"m-{args.quant}.manifest.json"), "--max-tokens", "16", "--temperature", "0",
                "--no-prefix-cache"]
    e2e: dict[str, list] = {"huatuo-local chat": [], "llama-mtmd-cli": []}
    from statistics import median

    from huatuo_local.runtime.system import physical_cores

    # Alternating pairs, as many as --pairs: this machine's speed drifts, so each pair is measured together.
    for _ in range(args.pairs):
        e2e["huatuo-local chat"].append(wall_and_peak(ours_cmd, {"HUATUO_LOCAL_HOME": str(out / "home"),
                                                                 "HUATUO_LOCAL_TRACE": "1"}, keep_log=True))
        if bins is not None:
            theirs = [str(bins / "llama-mtmd-cli"), "-m", str(llm), "--mmproj", str(mmproj), "--image",
                      str(image), "-p", question, "-n", "16", "--temp", "0", "-c", "4096", "-t",
                      str(physical_cores())]
            e2e["llama-mtmd-cli"].append(wall_and_peak(theirs, {"LD_LIBRARY_PATH": str(bins)}, keep_log=True))
        print({k: [(round(r[0], 2), round(r[3], 2), round(r[1], 2)) for r in v] for k, v in e2e.items()}, flush=True)
    rows2 = ["| whole one-shot run (load, image, 16 tokens) | wall (median) | each pair | first token (median) | "
             "peak RSS |", "|---|---|---|---|---|"]
    for name, runs in e2e.items():
        if runs:
            rows2.append(f"| {name} | {median(r[0] for r in runs):.1f} s | "
                         f"{', '.join(f'{r[0]:.1f}' for r in runs)} s | {median(r[3] for r in runs):.1f} s | "
                         f"{max(r[1] for r in runs):.2f} GiB |")
    ours, theirs_runs = e2e["huatuo-local chat"], e2e["llama-mtmd-cli"]
    if theirs_runs:
        ratio = median(r[0] for r in ours) / median(r[0] for r in theirs_runs)
        pairs = ", ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(ours, theirs_runs))
        rows2.append(f"| ratio (ours / llama-mtmd-cli) | {ratio:.2f}x | {pairs} | | |")
    # Where the time goes, from each side's median run: our phases (HUATUO_LOCAL_TRACE) beside llama-mtmd-cli's
    # timestamped log; for both, the first answer text on standard output and the process's exit.
    mid = sorted(ours, key=lambda r: r[0])[len(ours) // 2]
    rows3 = ["| huatuo-local chat: phase ended at | s |", "|---|---|"]
    rows3 += [f"| {name} | {t:.2f} |" for name, t in our_phases(mid[2]).items()]
    rows3 += [f"| first answer text on stdout | {mid[3]:.2f} |", f"| process exit | {mid[0]:.2f} |"]
    if theirs_runs:
        tmid = sorted(theirs_runs, key=lambda r: r[0])[len(theirs_runs) // 2]
        rows3 += ["", "| llama-mtmd-cli: phase ended at (its log's timestamps) | s |", "|---|---|"]
        rows3 += [f"| {name} | {t:.2f} |" for name, t in their_phases(tmid[2]).items()]
        rows3 += [f"| first answer text on stdout | {tmid[3]:.2f} |", f"| process exit | {tmid[0]:.2f} |"]
    table = ("\n".join(rows) + "\n\n" if best else "") + "\n".join(rows2) + "\n\n" + "\n".join(rows3)
    notes = (f"{args.quant} LLM with {args.shape} layer shapes at {args.depth} layers, F16 mmproj, random weights; "
             f"file {llm.stat().st_size / gib:.2f} GiB, in the page cache (warm) for every run. Best of "
             f"{args.rounds} interleaved rounds for times, largest for memory, each in a fresh process. `read`: "
             "llama.cpp reads the file into its buffers; `mmap`: it maps the file and copies the tensors it repacks, "
             "whose mapped pages stay resident; `mmap-release` (the default on CPU): mapped, and the pages "
             "already read are dropped as loading proceeds (`MappedPages` in runtime/engine/loading.py). File-backed "
             "pages are page cache the kernel can reclaim; anonymous pages are not. Threads: "
             f"{os.cpu_count()} logical, the physical cores used.")
    if args.no_append:
        print(table + "\n\n" + notes)
    else:
        append(f"Model load ({args.shape} shapes, {args.depth} layers)",
               f"`{invocation()}`", table, notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--depth", type=int, default=4, help="which of runtime.py's checkpoints to use")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="+", help="labels of the settings to run (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--load", action="store_true", help="measure model loading (see above)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="--load without the llama-mtmd-cli rows")
    ap.add_argument("--pairs", type=int, default=3, help="--load: alternating pairs of whole one-shot runs")
    ap.add_argument("--only-e2e", action="store_true", help="--load: only the whole one-shot runs")
    ap.add_argument("--shape", choices=["7b", "34b"], default="7b", help="layer shapes")
    args = ap.parse_args()
    from huatuo_local.runtime.engine.engine import EngineOptions, default_ubatch

    import runtime as rb

    if args.tiny:
        rb.tiny_shapes()
    work = args.workdir
    if args.shape == "34b":
        # Yi-1.5-34B's layer shapes (hidden 7168, MLP 20480, 56 heads, 8 KV heads) on the qwen2 layout
        # with the Qwen vocabulary: loading depends on tensor sizes and types, not on the architecture.
        rb.shapes.H, rb.shapes.FFN, rb.shapes.HEADS, rb.shapes.KV = 7168, 20480, 56, 8
        work = work / "34b"
    image = rb.write_image(work)
    # bench/runtime.py converts once and writes the checkpoint only when a conversion needs it (at full 34B
    # depth it is tens of GB; once converted it may be deleted).
    if args.load:
        bench_load(args, rb.converted_pair(work, args.depth, args.quant), image)
        return
    chosen = [s for s in SETTINGS if not args.only or s[0] in args.only]
    for quant in dict.fromkeys(opts.get("quant", args.quant) for _, opts, _ in chosen):
        out = rb.converted_pair(work, args.depth, quant)  # one folder for every quant
    mmproj = str(out / "mmproj-m-f16.gguf")
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for label, options, vision_fa in chosen:
            options = dict(options)
            llm = str(out / f"m-{options.pop('quant', args.quant)}.gguf")
            r = run_measured(CHILD.format(options=options, vision_fa=vision_fa, llm=llm, mmproj=mmproj,
                                          image=str(image)))
            print(label, json.dumps(r), flush=True)
            keep = best.setdefault(label, r)
            for k, v in r.items():
                if k.endswith("_s"):
                    keep[k] = min(keep[k], v)
    d = EngineOptions()
    threads = d.threads
    peak = rb.sgemm_gflop_s(threads)
    positions = next(iter(best.values()))["positions"]
    enc_gflop, pre_gflop = rb.encode_gflop(positions), rb.prefill_gflop(positions, args.depth)
    rows = [f"| setting | image encode | image prefill ({positions} positions) | text prefill tok/s | "
            "TTFT (encode + image + question) | decode tok/s | peak RSS |",
            "|---|---|---|---|---|---|---|"]
    for label, _, _ in chosen:
        r = best[label]
        ttft = r["encode_s"] + r["image_prefill_s"] + r["question_s"]
        rows.append(f"| {label} | {r['encode_s']:.2f} s ({enc_gflop / r['encode_s'] / peak:.0%}) | "
                    f"{r['image_prefill_s']:.2f} s ({pre_gflop / r['image_prefill_s'] / peak:.0%}) | "
                    f"{r['positions'] / r['text_prefill_s']:.1f} | {ttft:.2f} s | {1 / r['decode_s']:.2f} | "
                    f"{r['peak_rss_kib'] / 1024**2:.2f} GiB |")
    table = "\n".join(rows)
    shape = "Yi-1.5-34B" if args.shape == "34b" else "Qwen2-7B"
    notes = (f"{args.quant} LLM with {shape} layer shapes at {args.depth} layers (not extrapolated), F16 mmproj "
             f"with the full CLIP ViT-L/14-336 tower, random weights; best of {args.rounds} interleaved rounds, each "
             f"setting in a fresh process. The default row is `EngineOptions()`: n_batch {d.n_batch}, n_ubatch "
             f"{default_ubatch(False, rb.shapes.H)} (the engine's choice for this width), flash attention "
             f"{'on' if d.flash_attn else 'off'}, all cores ({threads}); the "
             "other rows change only what they name. In brackets: the share of the fp32 sgemm peak measured in the "
             f"same run ({peak:.0f} GFLOP/s, numpy's BLAS, {threads} threads) that the encode ({enc_gflop:.0f} GFLOP "
             f"for CLIP up to its second-to-last layer and the projector) and the image prefill ({pre_gflop:.0f} "
             "GFLOP) reach.")
    if args.no_append:
        print(table + "\n\n" + notes)
    else:
        append("Engine settings sweep" + (" (34B layer shapes)" if args.shape == "34b" else ""),
               f"`.venv/bin/just bench-settings` (= `{invocation()}`)",
               table, notes)


if __name__ == "__main__":
    main()
