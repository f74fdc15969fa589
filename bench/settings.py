"""Engine settings sweep: what micro-batch size, flash attention and threads do to an image turn.

Uses a checkpoint `bench/runtime.py` wrote (real shapes, random weights; `--depth` layers), converted
to `--quant`. Each setting runs in a fresh process; settings are interleaved over `--rounds` rounds
because this machine's speed drifts, and the best round of each is reported. Per setting: the CLIP
encode, the prefill of the 576 image embeddings (libmtmd's decode helper, timed apart from the
encode), a 576-token text prefill, and decode; the image turn's time to first token is
encode + image prefill + the question's tokens. The first row is the engine's default.

    .venv/bin/python bench/settings.py [--depth 4] [--quant Q4_K_M] [--rounds 2]
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
    ("ubatch 512", {"n_ubatch": 512}, None),
    ("ubatch 1024", {"n_ubatch": 1024}, None),
    ("encoder flash attention off", {}, False),
    ("1 thread", {"n_threads": 1}, None),
    ("weights mapped (mmap)", {"use_mmap": True}, None),
    # Q4_0 has simpler CPU kernels than Q4_K; FIDELITY.md ranks its quality below Q4_K_M's
    ("Q4_0 weights", {"quant": "Q4_0"}, None),
]

CHILD = """
import ctypes, json, time
import numpy as np
from huatuo_local.runtime import engine as E
from huatuo_local.runtime.images import load_rgb, prepare
VISION_FA = {vision_fa!r}
if VISION_FA is not None:
    mtmd = E._mtmd()
    default = mtmd.mtmd_context_params_default
    def patched():
        p = default(); p.flash_attn_type = 1 if VISION_FA else 0; return p
    mtmd.mtmd_context_params_default = patched
opts = E.EngineOptions(n_ctx=2048, **{options!r})
t0 = time.perf_counter()
eng = E.Engine({llm!r}, {mmproj!r}, opts)
load_s = time.perf_counter() - t0
pic = prepare(load_rgb({image!r}), eng.vision)
prefix, question = eng.tokenize("<|user|>\\n"), eng.tokenize("\\nWhat does the picture show?\\n<|assistant|>\\n")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--depth", type=int, default=4, help="which of runtime.py's checkpoints to use")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="+", help="labels of the settings to run (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from huatuo_local.convert.pipeline import convert
    from huatuo_local.runtime.engine import EngineOptions

    import runtime as rb

    if args.tiny:
        rb.tiny_shapes()
    work = args.workdir
    image = rb.write_image(work)
    ckpt = rb.write_checkpoint(work, args.depth)
    out = work / f"gguf-{args.depth}"
    chosen = [s for s in SETTINGS if not args.only or s[0] in args.only]
    for quant in dict.fromkeys(opts.get("quant", args.quant) for _, opts, _ in chosen):
        if not (out / f"m-{quant}.manifest.json").is_file():
            convert(ckpt, out, quant=quant, mmproj_type="f16", name="m")
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
    notes = (f"{args.quant} LLM with Qwen2-7B layer shapes at {args.depth} layers (not extrapolated), F16 mmproj "
             f"with the full CLIP ViT-L/14-336 tower, random weights; best of {args.rounds} interleaved rounds, each "
             f"setting in a fresh process. The default row is `EngineOptions()`: n_batch {d.n_batch}, n_ubatch "
             f"{d.ubatch}, flash attention {'on' if d.flash_attn else 'off'}, all cores ({threads}); the "
             "other rows change only what they name. In brackets: the share of the fp32 sgemm peak measured in the "
             f"same run ({peak:.0f} GFLOP/s, numpy's BLAS, {threads} threads) that the encode ({enc_gflop:.0f} GFLOP "
             f"for CLIP up to its second-to-last layer and the projector) and the image prefill ({pre_gflop:.0f} "
             "GFLOP) reach.")
    if args.no_append:
        print(table + "\n\n" + notes)
    else:
        append("Engine settings sweep", f"`.venv/bin/just bench-settings` (= `{invocation()}`)",
               table, notes)


if __name__ == "__main__":
    main()
