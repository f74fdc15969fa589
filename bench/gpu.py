"""GPU: decode, an image question's time to first token, and serving; huatuo-local beside llama.cpp's own
tools built from the same fixed source with the same CMAKE_ARGS (CUDA), on the same files.

    CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/python bench/gpu.py --depth 28        (7B shapes, all layers)

Goals (issue 20): decode >= 0.97x llama-bench tg128 and >= 0.97x llama-mtmd-cli; time to first token
<= 1.1x llama-mtmd-cli's; serve with 16 clients >= 0.9x llama-server -np 16 (64 measured too).
Appends its tables to BENCHMARKS.md (History) unless --no-append.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
import llama_tools  # noqa: E402
from common import append, invocation, run_measured  # noqa: E402

from runtime import QUESTION, converted_pair, llama_bench, write_image  # noqa: E402

OURS = """
import json
from huatuo_local import HuatuoChatbot
bot = HuatuoChatbot({manifest!r}, n_gpu_layers=-1, temperature=0, max_new_tokens={n}, prefix_cache=False)
bot.sampling.min_new_tokens = {n}  # random weights: decode a fixed number of tokens
bot.chat({question!r}, [{image!r}])  # warm the GPU kernels once, as llama.cpp's tools do
bot.clear_history()
bot.chat({question!r}, [{image!r}])
r = bot.last_reply
print(json.dumps({{"ttft_s": r.timings.first_token_s, "decode_tok_s": (len(r.tokens) - 1) / r.timings.generation_s,
                  "placement": bot.engine.placement_note}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = converted_pair(args.workdir, args.depth, args.quant)
    manifest = folder / f"m-{args.quant}.manifest.json"
    llm, mmproj = folder / f"m-{args.quant}.gguf", folder / "mmproj-m-f16.gguf"
    image = write_image(args.workdir)
    bin_dir = llama_tools.build()
    rates = llama_bench(bin_dir, llm, None, n_gen=args.tokens, repeat=3, ngl=99)
    tg = rates["tg_tok_s"]
    proc = llama_tools.run_tool(bin_dir, "llama-mtmd-cli", "-m", str(llm), "--mmproj", str(mmproj), "--image",
                                str(image), "-p", QUESTION, "-n", str(args.tokens), "-ngl", "99", "--temp", "0", "-c",
                                "4096", "--jinja", "--ignore-eos", timeout=1800)
    mtmd = proc.stdout + proc.stderr
    encode = float(re.search(r"encoded in (\d+) ms", mtmd).group(1)) / 1000
    prompt = float(re.search(r"prompt eval time =\s*([\d.]+) ms", mtmd).group(1)) / 1000
    gen = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", mtmd)
    ours = run_measured(OURS.format(manifest=str(manifest), n=args.tokens, question=QUESTION, image=str(image)))
    cpp_ttft, cpp_decode = encode + prompt, int(gen.group(2)) / (float(gen.group(1)) / 1000)
    table = ("| what | huatuo-local | llama.cpp | ratio |\n|---|---|---|---|\n"
             f"| decode tok/s ({args.tokens} tokens) | {ours['decode_tok_s']:.1f} | llama-bench tg{args.tokens} "
             f"{tg:.1f}; llama-mtmd-cli {cpp_decode:.1f} | {ours['decode_tok_s'] / tg:.2f}; "
             f"{ours['decode_tok_s'] / cpp_decode:.2f} |\n"
             f"| image question: time to first token | {ours['ttft_s']:.3f} s | llama-mtmd-cli {cpp_ttft:.3f} s "
             f"(encode {encode:.3f} + prompt {prompt:.3f}) | {ours['ttft_s'] / cpp_ttft:.2f} |\n"
             f"| prompt read (llama-bench pp600) | – | {rates['pp_tok_s']:.0f} tok/s | – |")
    print(table)
    print("placement:", ours["placement"])
    if not args.no_append:
        append(f"GPU: {args.depth} layers, {args.quant}", invocation(), table,
               f"Random weights, 7B shapes; the model placed by huatuo-local's default: {ours['placement']}. "
               "Serving: run bench/serve.py --ngl 99 --clients 1 16 64 (scripts/gpu_check.sh does).")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"bench/gpu.py: {time.time() - t0:.0f} s")
