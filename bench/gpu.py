"""GPU: decode, an image question's time to first token, and serving; huatuo-local beside llama.cpp's own
tools built from the same fixed source with the same CMAKE_ARGS (CUDA), on the same files.

    CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/python bench/gpu.py --depth 28        (7B shapes, all layers)

Goals (issue 20): decode >= 0.97x llama-bench tg128 (and llama-mtmd-cli, which prints no decode timing in
this build: llama-bench stands for both); time to first token <= 1.1x llama-mtmd-cli's (its image encode
plus the prompt at llama-bench's pp600 rate); serve with 16 clients >= 0.9x llama-server -np 16 (64 too).
Appends its tables to BENCHMARKS.md (History) unless --no-append.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
import llama_tools  # noqa: E402
from common import append, invocation, run_measured, write_json  # noqa: E402

from runtime import (  # noqa: E402
    QUESTION,
    converted_pair,
    llama_bench,
    llama_mtmd_cli,
    tiny_shapes,
    write_checkpoint,
    write_image,
)

OURS = """
import json, time
from PIL import Image
from huatuo_local import HuatuoChatbot
from huatuo_local.runtime.engine.engine import Engine
# Each llama_decode's duration: the rest of a token's time is huatuo-local's own (sampling, text, events).
durations = []
_decode = Engine._decode
def timed(self, batch):
    t = time.perf_counter()
    _decode(self, batch)
    durations.append(time.perf_counter() - t)
Engine._decode = timed
bot = HuatuoChatbot({manifest!r}, n_gpu_layers=-1, temperature=0, max_new_tokens={n}, prefix_cache=False)
bot.sampling.min_new_tokens = {n}  # random weights: decode a fixed number of tokens
bot.chat({question!r}, [{image!r}])  # the first turn: the GPU's kernels start cold, as a user meets them
cold = bot.last_reply.timings.first_token_s
# Then another image (the mirrored one: nothing of it is cached), kernels warm as in llama.cpp's tools
other = {image!r} + ".mirrored.png"
Image.open({image!r}).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
bot.clear_history()
durations.clear()
bot.chat({question!r}, [other])
r = bot.last_reply
n = len(r.tokens) - 1
outside = r.timings.generation_s / n - sum(durations[-n:]) / n
print(json.dumps({{"ttft_s": r.timings.first_token_s, "cold_ttft_s": cold, "outside_decode_ms": outside * 1e3,
                  "decode_tok_s": n / r.timings.generation_s, "positions": r.prompt_positions,
                  "reused": r.counters.tokens_reused, "placement": bot.engine.placement.note,
                  "on_gpu": bot.engine.on_gpu}}))
"""

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a fast step: the per-token overhead shows)")
    ap.add_argument("--prepare", choices=["checkpoint", "model"],
                    help="only write the random checkpoint (needs no engine) or also convert it (needs the engine's "
                         "quantizer), then exit: scripts/gpu_check.sh does this beside the build and the tests")
    args = ap.parse_args()
    if args.tiny:
        tiny_shapes()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.prepare == "checkpoint":
        write_checkpoint(args.workdir, args.depth)
        return
    folder = converted_pair(args.workdir, args.depth, args.quant)
    if args.prepare == "model":
        return
    manifest = folder / f"m-{args.quant}.manifest.json"
    llm, mmproj = folder / f"m-{args.quant}.gguf", folder / "mmproj-m-f16.gguf"
    image = write_image(args.workdir)
    bin_dir = llama_tools.bin_folder()
    threads = os.cpu_count() or 2  # huatuo-local's default: llama.cpp's tools get the same
    ours = run_measured(OURS.format(manifest=str(manifest), n=args.tokens, question=QUESTION, image=str(image)))
    fa = "auto" if ours["on_gpu"] else "off"  # as our engine chose (runtime/engine/engine.py, flash_attn_type)
    rates = llama_bench(bin_dir, llm, threads, n_gen=args.tokens, repeat=3, ngl=99, fa=fa)
    # Our answer is decoded after the image question's positions: llama-bench's tg at that depth too.
    tg = llama_bench(bin_dir, llm, threads, n_gen=args.tokens, repeat=3, ngl=99, depth=ours["positions"],
                     fa=fa)["tg_tok_s"]
    encode = llama_mtmd_cli(bin_dir, llm, mmproj, image, threads, ngl=99)["encode_s"]
    # llama-mtmd-cli prints its image encode time but no prompt or decode timings: its time to first token
    # is that encode plus our prompt's positions at llama-bench's pp600 rate (as bench/runtime.py counts it).
    prompt = ours["positions"] / rates["pp_tok_s"]  # all of them, though ours reused the system prompt's few
    cpp_ttft = encode + prompt
    table = ("| what | huatuo-local | llama.cpp | ratio |\n|---|---|---|---|\n"
             f"| decode tok/s ({args.tokens} tokens after the image question) | {ours['decode_tok_s']:.1f} | "
             f"llama-bench tg{args.tokens} at depth {ours['positions']}: {tg:.1f} (at depth 0: "
             f"{rates['tg_tok_s']:.1f}) | {ours['decode_tok_s'] / tg:.2f} |\n"
             f"| image question: time to first token | {ours['ttft_s']:.3f} s | {cpp_ttft:.3f} s (llama-mtmd-cli's "
             f"encode {encode:.3f} + {ours['positions']} positions at pp600 {prompt:.3f}; ours reused "
             f"{ours['reused']} of them) | "
             f"{ours['ttft_s'] / cpp_ttft:.2f} |\n"
             f"| the same, the process's first turn (kernels cold) | {ours['cold_ttft_s']:.3f} s | – | – |\n"
             f"| per token outside llama_decode (sampling, text, events) | {ours['outside_decode_ms']:.3f} ms "
             f"of {1e3 / ours['decode_tok_s']:.3f} | – | – |\n"
             f"| prompt read (llama-bench pp600) | – | {rates['pp_tok_s']:.0f} tok/s | – |")
    print(table)
    print("placement:", ours["placement"])
    write_json(args.json, {"depth": args.depth, "quant": args.quant, "tokens": args.tokens, "ours": ours,
                           "llama_bench": {"pp_tok_s": rates["pp_tok_s"], "tg_tok_s": rates["tg_tok_s"],
                                           "tg_at_depth_tok_s": tg},
                           "llama_mtmd_cli": {"encode_s": encode, "ttft_s": cpp_ttft},
                           "ratios": {"decode": ours["decode_tok_s"] / tg, "ttft": ours["ttft_s"] / cpp_ttft},
                           "goals": {"decode": ">= 0.97", "ttft": "<= 1.1"}})
    if not args.no_append:
        append(f"GPU: {args.depth} layers, {args.quant}", invocation(), table,
               f"Random weights, 7B shapes; the model placed by huatuo-local's default: {ours['placement']}. "
               "Serving: run bench/serve.py --ngl 99 --clients 1 16 64 (scripts/gpu_check.sh does).")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"bench/gpu.py: {time.time() - t0:.0f} s")
