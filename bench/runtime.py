"""Runtime speed and memory: huatuo-local vs llama.cpp's own tools vs the PyTorch stack.

Models with HuatuoGPT-Vision-7B's real shapes and random weights, written by this script:
the full CLIP ViT-L/14-336 tower and projector, the full 152064-token embeddings and LM head,
and Qwen2-7B decoder layers at two reduced depths. Per-layer costs are fitted on the two depths
and extrapolated to 28 layers (marked "→28L"). Every contender uses the same thread count.

    .venv/bin/python bench/runtime.py [--depths 2 4] [--quants F16 Q8_0 Q4_K_M] [--threads 2]

`--interactive` measures what a user of the REPL waits for instead: `huatuo-local chat scan.png` in a
pseudo-terminal, the question typed 5, 20 and 60 s after the start (`--type-after`), and the time from
pressing Enter to the answer's first byte, at one depth (`--depths 28 28` for the full 7B) and quant:

    .venv/bin/python bench/runtime.py --interactive --depths 28 28 --quants Q4_K_M
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from common import append, invocation, run_measured  # noqa: E402

import convert as shapes  # noqa: E402  (bench/convert.py: the checkpoint writer)

FULL_DEPTH = 28
IMAGE_TOKENS = (336 // 14) ** 2  # every shape here keeps CLIP-336's image and patch sizes
QUESTION = "What does the picture show? Describe the findings."
FOLLOW_UP = "Is there anything abnormal in the lower left part of the image?"
ANSWER = ("The image is an axial CT slice of the chest in the lung window. There is a small, well-defined nodule of "
          "about eight millimetres in the right upper lobe; the airways are patent and there is no pleural effusion "
          "or enlarged lymph node.")


def write_checkpoint(work: Path, depth: int) -> Path:
    import qwen_vocab

    tok = work / "tokenizer"
    if not tok.is_dir():
        qwen_vocab.build(tok)
    ckpt = work / f"ckpt-{depth}"
    if (ckpt / "config.json").is_file():
        return ckpt
    ckpt.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(depth)
    shapes.write_st(ckpt / "model-00001-of-00002.safetensors", shapes.llm_tensors(depth), rng)
    shapes.write_st(ckpt / "model-00002-of-00002.safetensors", shapes.mm_tensors(), rng)
    weight_map = {n: "model-00001-of-00002.safetensors" for n in shapes.llm_tensors(depth)}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in shapes.mm_tensors()})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (ckpt / "config.json").write_text(json.dumps(shapes.config(depth, True)))
    for f in tok.iterdir():
        shutil.copy(f, ckpt / f.name)
    return ckpt


def converted_pair(work: Path, depth: int, quant: str) -> Path:
    """The folder holding m-QUANT.gguf and mmproj-m-f16.gguf for this depth, converted once."""
    from huatuo_local.convert.pipeline import convert

    out = work / f"gguf-{depth}"
    if not (out / f"m-{quant}.manifest.json").is_file():  # the checkpoint only when a conversion needs it
        convert(write_checkpoint(work, depth), out, quant=quant, mmproj_type="f16", name="m")
    return out


def tiny_shapes() -> None:
    shapes.H, shapes.FFN, shapes.HEADS, shapes.KV, shapes.VH, shapes.VFFN, shapes.VLAYERS = (
        256, 512, 2, 1, 64, 128, 3)


def write_image(work: Path) -> Path:
    from PIL import Image

    work.mkdir(parents=True, exist_ok=True)
    image = work / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((512, 640, 3)) * 255).astype(np.uint8)).save(image)
    return image


def ours(manifest: Path, image: Path, threads: int, home: Path, n_gen: int) -> dict:
    """Turn 1 with an image, follow-ups about it, then a new process asking about the cached image."""
    turn = f"""
import json, time
from huatuo_local import HuatuoChatbot
from huatuo_local.runtime.images.loader import load_rgb, prepare
bot = HuatuoChatbot({str(manifest)!r}, temperature=0, max_new_tokens={n_gen}, threads={threads})
bot.sampling.min_new_tokens = {n_gen}  # random weights: decode a fixed number of tokens
# Random weights answer with token sequences no tokenizer would produce, so an answer's text
# re-tokenizes differently and the next turn re-evaluates it. A trained model's answers
# re-tokenize as generated: every answer is steered through a real answer's tokens (same work).
def steer():
    forced = iter(bot.engine.tokenizer.tokenize({ANSWER!r}))
    def steered(logits):
        logits.fill(-1e9)
        logits[next(forced, 0)] = 1e4  # stays on top through the repetition penalty
        return logits
    bot.session.logit_hook = steered
out = {{}}
steer()
bot.chat({QUESTION!r}, [{str(image)!r}])
r = bot.last_reply
out.update(ttft_s=r.timings.first_token_s, positions=r.prompt_positions, gen_tokens=len(r.tokens),
           gen_s=r.timings.generation_s, image_s=r.timings.image_encode_s, prompt_s=r.timings.prompt_s,
           hits=r.counters.prefix_cache_hits, encoded=r.counters.images_encoded)
if {{MODE!r}} == "cold":
    # Follow-ups of equal length, alternating: plain, then with the start pre-filled as the REPL does
    # while the user types. Best of two each, in the same process, so drift hits both alike.
    bot.sampling.max_new_tokens = bot.sampling.min_new_tokens = 4
    for k in range(4):
        key = "turn2_prefilled" if k % 2 else "turn2"
        if k % 2:
            t0 = time.perf_counter(); out["prefilled"] = bot.prefill_next_turn()
            out["prefill_s"] = time.perf_counter() - t0
        steer()
        bot.chat({FOLLOW_UP!r})
        out[key + "_ttft_s"] = min(out.get(key + "_ttft_s", 1e9), bot.last_reply.timings.first_token_s)
        out[key + "_evaluated"] = bot.last_reply.counters.prompt_tokens_evaluated
    bot.session.logit_hook = None
    pic = prepare(load_rgb({str(image)!r}), bot.engine.vision)
    t0 = time.perf_counter(); bot.engine.image_embeddings(pic); out["encode_s"] = time.perf_counter() - t0
print(json.dumps(out))
"""
    env = {"HUATUO_LOCAL_HOME": str(home)}
    shutil.rmtree(home / "prefix-cache", ignore_errors=True)
    cold = run_measured(turn.replace("{MODE!r}", repr("cold")), env)
    warm = run_measured(turn.replace("{MODE!r}", repr("warm")), env)
    assert warm["hits"] == 1 and warm["encoded"] == 0, warm
    return {"cold": cold, "cached": warm}


def llama_bench(bin_dir: Path, gguf: Path, threads: int | None, n_gen: int = 32, repeat: int = 2,
                ngl: int | None = None, depth: int = 0, fa: str | None = None) -> dict:
    """llama-bench's pp600 and tg`n_gen` rates (tokens/s, the mean of `repeat` runs), both after `depth`
    positions already in the context; `threads`, `ngl` or `fa` (flash attention: on, off, auto) None: the
    tool's default."""
    import llama_tools

    args = ["llama-bench", "-m", str(gguf), "-p", "600", "-n", str(n_gen), "-r", str(repeat), "-o", "json",
            "-d", str(depth)]
    args += ["-t", str(threads)] if threads is not None else []
    args += ["-ngl", str(ngl)] if ngl is not None else []
    args += ["-fa", fa] if fa is not None else []
    out = {}
    for row in json.loads(llama_tools.run_tool(bin_dir, *args).stdout):
        key = "pp_tok_s" if row.get("n_prompt") else "tg_tok_s"
        out[key] = float(row["avg_ts"])
    return out


def llama_mtmd_cli(bin_dir: Path, gguf: Path, mmproj: Path, image: Path, threads: int | None,
                   ngl: int | None = None) -> dict:
    """llama-mtmd-cli's wall time and image encode time (it prints no prompt or decode timings)."""
    import llama_tools

    args = ["llama-mtmd-cli", "-m", str(gguf), "--mmproj", str(mmproj), "--image", str(image), "-p", QUESTION,
            "-n", "8", "--temp", "0", "--no-warmup", "-c", "4096"]
    args += ["-t", str(threads)] if threads is not None else []
    args += ["-ngl", str(ngl)] if ngl is not None else []
    t0 = time.perf_counter()
    proc = llama_tools.run_tool(bin_dir, *args)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    out = {"wall_s": wall}
    m = re.search(r"(?:image slice encoded|mtmd batch encoding done) in (\d+) ms", log)
    if m:
        out["encode_s"] = int(m.group(1)) / 1000
    return out


def pytorch(depth: int, dtype: str, threads: int, n_gen: int = 8) -> dict:
    code = f"""
import json, time, torch
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM
torch.set_num_threads({threads}); torch.set_grad_enabled(False)
dt = getattr(torch, {dtype!r})
tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, image_size=336, patch_size=14)).to(dt).eval()
llm = Qwen2ForCausalLM(Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers={depth},
      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)).to(dt).eval()
proj = torch.nn.Sequential(torch.nn.Linear(1024, 3584), torch.nn.GELU(), torch.nn.Linear(3584, 3584)).to(dt)
px = torch.randn(1, 3, 336, 336, dtype=dt)
t0 = time.perf_counter(); feats = proj(tower(px, output_hidden_states=True).hidden_states[-2][:, 1:])
enc = time.perf_counter() - t0
emb = torch.cat([llm.get_input_embeddings()(torch.arange(12)[None]), feats], 1)
t0 = time.perf_counter(); out = llm(inputs_embeds=emb, use_cache=True); prefill = time.perf_counter() - t0
cache = getattr(out, "cache", None) or out.past_key_values
t0 = time.perf_counter()
for _ in range({n_gen}):
    out = llm(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
dec = time.perf_counter() - t0
print(json.dumps(dict(encode_s=enc, prefill_s=prefill, ttft_s=enc + prefill, decode_tok_s={n_gen} / dec,
                      positions=emb.shape[1])))
"""
    return run_measured(code)


def copy_bandwidth_gb_s() -> float:
    a = np.ones(256 * 1024 * 1024 // 8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t0) / 1e9)  # read + write
    return best


def sgemm_gflop_s(threads: int) -> float:
    """fp32 matrix-multiply rate (numpy's BLAS, `threads` threads): the compute ceiling prefill and encode face."""
    code = ("import os, time, numpy as np\n"
            "a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32); a @ a\n"
            "best = min((lambda t0: (a @ a, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(5))\n"
            "print(2 * 2048**3 / best / 1e9)\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(proc.stdout.split()[-1])


def encode_gflop(positions: int) -> float:
    """Multiply-adds of the CLIP tower up to the selected layer (the second to last) and the projector."""
    t, h, f = positions + 1, shapes.VH, shapes.VFFN  # + the class token
    layer = 2 * t * (4 * h * h + 2 * h * f) + 2 * 2 * t * t * h
    return ((shapes.VLAYERS - 1) * layer + 2 * positions * (h * shapes.H + shapes.H * shapes.H)) / 1e9


def prefill_gflop(positions: int, layers: int = FULL_DEPTH) -> float:
    """Multiply-adds of the decoder layers over a prompt (causal attention: half the square)."""
    h, kv = shapes.H, shapes.H * shapes.KV // shapes.HEADS
    layer = 2 * positions * (2 * h * h + 2 * h * kv + 3 * h * shapes.FFN) + 2 * positions * positions * h
    return (layers * layer + 2 * h * shapes.VOCAB) / 1e9


def median(runs: list):
    """Value by value median of repeated runs (numbers); the first run's value for anything else."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: median([r[k] for r in runs if k in r]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return float(np.median(runs))
    return first


def fit(d: list[int], v: list[float], target: int = FULL_DEPTH) -> float:
    """Linear in the number of layers: v = a + b * layers, evaluated at `target` (measured at full depth)."""
    if d[0] == d[1]:
        return v[0] if d[0] == target else float("nan")
    b = (v[1] - v[0]) / (d[1] - d[0])
    return v[0] + b * (target - d[0])


def interactive(manifest: Path, image: Path, home: Path, type_after: float) -> dict:
    """Seconds from Enter to the answer's first byte when the question is typed `type_after` s after start.

    stderr goes to /dev/null so that only the answer follows the echoed question (the progress line is
    stderr's); stdin and stdout stay a terminal, so the REPL runs and reads the image in the background.
    """
    import pexpect

    exe = Path(sys.executable).with_name("huatuo-local")
    cmd = (f"exec {exe} chat {image} --model {manifest} --temperature 0 --max-tokens 4 --no-prefix-cache "
           "2>/dev/null")
    t_start = time.perf_counter()
    child = pexpect.spawn("bash", ["-c", cmd], env=dict(os.environ, HUATUO_LOCAL_HOME=str(home)),
                          encoding="utf-8", timeout=900)
    try:
        child.expect_exact(">>> ")
        ready = time.perf_counter() - t_start
        time.sleep(max(0.0, type_after - (time.perf_counter() - t_start)))
        child.sendline(QUESTION)
        t_enter = time.perf_counter()
        child.expect_exact(QUESTION + "\r\n")  # the terminal's echo of the typed line
        child.read_nonblocking(1, timeout=900)
        first = time.perf_counter() - t_enter
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return {"type_after_s": type_after, "prompt_ready_s": ready, "enter_to_first_byte_s": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs=2, default=[2, 4])
    ap.add_argument("--quants", nargs="+", default=["F16", "Q8_0", "Q4_K_M"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-pytorch", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="run every contender this many times, alternating; "
                    "report medians")
    ap.add_argument("--title", default="Runtime: time to first token, decode, memory")
    ap.add_argument("--from-results", action="store_true",
                    help="re-measure llama-mtmd-cli's encode on the GGUFs of results.json, then report")
    ap.add_argument("--report-only", type=Path, help="report a saved results.json (no measuring)")
    ap.add_argument("--interactive", action="store_true", help="the REPL's wait after Enter (see above)")
    ap.add_argument("--type-after", type=float, nargs="+", default=[5, 20, 60])
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads(args.report_only.read_text())
        results = {(int(k.split("|")[0]), k.split("|")[1]): v for k, v in saved.items()}
        report(results, args, saved.get("0|bandwidth") or {"gb_s": copy_bandwidth_gb_s()})
        return
    if args.tiny:
        tiny_shapes()
    from huatuo_local.convert.pipeline import convert

    work = args.workdir
    image = write_image(work)
    bin_dir = None
    if not args.no_llama_cpp:
        try:
            import llama_tools

            bin_dir = llama_tools.bin_folder()
        except Exception as exc:  # a missing compiler must not stop our own figures
            print(f"llama.cpp tools skipped: {exc}")
    results: dict = {}
    if args.interactive:
        run_interactive(args, work, image)
        return
    if args.from_results:
        saved = json.loads((work / "results.json").read_text())
        results = {(int(k.split("|")[0]), k.split("|")[1]): v for k, v in saved.items()}
        for (depth, quant), r in results.items():
            if "ours" in r and bin_dir is not None:
                out = work / f"gguf-{depth}"
                r["mtmd_cli"] = llama_mtmd_cli(bin_dir, out / f"m-{quant}.gguf", out / "mmproj-m-f16.gguf", image,
                                               args.threads)
        report(results, args, {"gb_s": copy_bandwidth_gb_s(), "sgemm_gflop_s": sgemm_gflop_s(args.threads)})
        return
    peaks: list[float] = []
    depths = list(dict.fromkeys(args.depths))  # --depths 28 28: one full-depth run, nothing extrapolated
    ckpts = {depth: write_checkpoint(work, depth) for depth in depths}
    # The two depths of a fit run back to back for each contender: the machine's speed drifts over
    # minutes, and the fit multiplies a difference between them by 13.
    for quant in args.quants:
        for depth in depths:
            out = work / f"gguf-{depth}"
            manifest = out / f"m-{quant}.manifest.json"
            if not manifest.is_file():
                convert(ckpts[depth], out, quant=quant, mmproj_type="f16", name="m")
        for depth in depths:
            out = work / f"gguf-{depth}"
            manifest = out / f"m-{quant}.manifest.json"
            gguf, mmproj = out / f"m-{quant}.gguf", out / "mmproj-m-f16.gguf"
            runs = []
            for _ in range(args.repeat):  # contenders alternate, so a drift of the machine hits both
                r = {"ours": ours(manifest, image, args.threads, work / "home", args.gen)}
                r["size_gib"] = gguf.stat().st_size / 1024**3  # what decoding reads per token, roughly
                if bin_dir is not None:
                    try:
                        r["llama_bench"] = llama_bench(bin_dir, gguf, args.threads)
                        r["mtmd_cli"] = llama_mtmd_cli(bin_dir, gguf, mmproj, image, args.threads)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        print(f"llama.cpp tools failed on {gguf.name}: {exc}")
                print(depth, quant, json.dumps(r), flush=True)
                runs.append(r)
                peaks.append(sgemm_gflop_s(args.threads))  # through the run: the machine's speed drifts
            results[(depth, quant)] = median(runs)
    if not args.no_pytorch and not args.tiny:
        for dtype in ("bfloat16", "float32"):
            for depth in depths:
                try:
                    results[(depth, f"torch-{dtype}")] = pytorch(depth, dtype, args.threads)
                except RuntimeError as exc:
                    print(f"PyTorch {dtype} failed at depth {depth}: {str(exc).splitlines()[-1]}")
    rates = {"gb_s": copy_bandwidth_gb_s(), "sgemm_gflop_s": max([*peaks, sgemm_gflop_s(args.threads)]),
             "sgemm_measurements": len(peaks) + 1}
    results[(0, "bandwidth")] = rates
    (work / "results.json").write_text(json.dumps({f"{k[0]}|{k[1]}": v for k, v in results.items()}, indent=1))
    report(results, args, rates)


def run_interactive(args, work: Path, image: Path) -> None:
    depth, quant = args.depths[0], args.quants[0]
    manifest = converted_pair(work, depth, quant) / f"m-{quant}.manifest.json"
    # The one-shot path's time to first token on the same files: what the wait was without reading ahead.
    oneshot = run_measured(f"""
import json
from huatuo_local import HuatuoChatbot
bot = HuatuoChatbot({str(manifest)!r}, temperature=0, max_new_tokens=4, prefix_cache=False)
bot.chat({QUESTION!r}, [{str(image)!r}])
t = bot.last_reply.timings
print(json.dumps(dict(ttft_s=t.first_token_s)))
""")
    print("one-shot", json.dumps(oneshot), flush=True)
    runs = []
    for after in args.type_after:
        r = interactive(manifest, image, work / "home", after)
        print(json.dumps(r), flush=True)
        runs.append(r)
    rows = ["| question typed after | prompt shown after | wait from Enter to the answer's first byte |",
            "|---|---|---|"]
    rows += [f"| {r['type_after_s']:.0f} s | {r['prompt_ready_s']:.1f} s | {r['enter_to_first_byte_s']:.2f} s |"
             for r in runs]
    rows.append(f"| (one-shot `chat -p`, nothing read ahead: time to first token) | | {oneshot['ttft_s']:.2f} s |")
    notes = (f"`huatuo-local chat scan.png` in a pseudo-terminal, {quant} LLM with Qwen2-7B shapes at {depth} "
             "layers, F16 mmproj, random weights, greedy, no prefix cache, each run a fresh process. The REPL "
             "encodes and prefills the image part of the next turn as soon as it starts; the question then only "
             "adds its own tokens. 'Prompt shown after': from the start of the command to the `>>>` prompt "
             "(model load).")
    if args.no_append:
        print("\n".join(rows) + "\n\n" + notes)
    else:
        append(f"Interactive chat: wait after Enter ({depth} layers, {quant})", f"`{invocation()}`",
               "\n".join(rows), notes)


def report(results: dict, args, rates: dict) -> None:
    d = args.depths
    bw, peak = rates["gb_s"], rates.get("sgemm_gflop_s")
    lines = ["| contender | quant | TTFT turn 1 (image) →28L | image encode | prefill tok/s →28L | decode tok/s →28L "
             "| turn 2 TTFT →28L | turn 2, start pre-filled →28L | new process, cached image TTFT →28L | peak RSS →28L "
             "| decode / bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios: list[str] = []
    torch_bf16 = [results.get((x, "torch-bfloat16")) for x in d]
    torch_bf16 = torch_bf16 if all(torch_bf16) else None
    for quant in args.quants:
        rs = [results.get((x, quant)) for x in d]
        if not all(rs):
            continue
        cold = [r["ours"]["cold"] for r in rs]
        warm = [r["ours"]["cached"] for r in rs]
        ttft = fit(d, [c["ttft_s"] for c in cold])
        prefill_s = fit(d, [c["ttft_s"] - c["encode_s"] for c in cold])
        positions = cold[0]["positions"]
        dec_s = fit(d, [c["gen_s"] / c["gen_tokens"] for c in cold])
        turn2 = fit(d, [c["turn2_ttft_s"] for c in cold])
        cached = fit(d, [w["ttft_s"] for w in warm])
        pre2 = fit(d, [c["turn2_prefilled_ttft_s"] for c in cold]) if "prefilled" in cold[0] else float("nan")
        pre2_text = f"{pre2:.2f} s ({int(cold[-1]['turn2_prefilled_evaluated'])} new)" if pre2 == pre2 else "–"
        rss = fit(d, [c["peak_rss_kib"] / 1024**2 for c in cold])
        size28 = fit(d, [r["size_gib"] for r in rs])
        bound = bw / (size28 * 1.0737)  # every LLM weight is read once per token; GB/s over GB
        lines.append(f"| huatuo-local | {quant} | {ttft:.1f} s | {cold[-1]['encode_s']:.2f} s | "
                     f"{positions / prefill_s:.1f} | {1 / dec_s:.2f} | "
                     f"{turn2:.2f} s ({int(cold[-1]['turn2_evaluated'])} new) | {pre2_text} | {cached:.2f} s | "
                     f"{rss:.2f} GiB | {1 / dec_s / bound:.0%} of {bound:.2f} |")
        parts = []
        if all("mtmd_cli" in r for r in rs):
            m = [r["mtmd_cli"] for r in rs]
            b = [r["llama_bench"] for r in rs]
            pp = 1 / fit(d, [1 / x["pp_tok_s"] for x in b])
            tg = 1 / fit(d, [1 / x["tg_tok_s"] for x in b])
            ttft_cpp = m[-1].get("encode_s", float("nan")) + positions / pp
            lines.append(f"| llama.cpp (llama-mtmd-cli, llama-bench) | {quant} | {ttft_cpp:.1f} s | "
                         f"{m[-1].get('encode_s', float('nan')):.2f} s | {pp:.1f} | {tg:.2f} | – | – | – | – | – |")
            parts.append(f"TTFT ours/llama.cpp {ttft / ttft_cpp:.2f}, decode ours/llama.cpp {(1 / dec_s) / tg:.2f}")
        if torch_bf16:
            parts.append(f"TTFT ours/PyTorch bf16 {ttft / fit(d, [r['ttft_s'] for r in torch_bf16]):.2f}, peak RSS "
                         f"ours/PyTorch bf16 {rss / fit(d, [r['peak_rss_kib'] / 1024**2 for r in torch_bf16]):.2f}")
        parts.append(f"turn 2 / turn 1 {turn2 / ttft:.3f} (pre-filled {pre2 / ttft:.3f}), "
                     f"cached / cold {cached / ttft:.3f}, decode / bound {1 / dec_s / bound:.2f}")
        if peak:
            enc = encode_gflop(IMAGE_TOKENS) / cold[-1]["encode_s"]
            pre = prefill_gflop(positions) / prefill_s
            parts.append(f"image encode {enc:.0f} GFLOP/s ({enc / peak:.0%} of the sgemm peak), prefill →28L "
                         f"{pre:.0f} GFLOP/s ({pre / peak:.0%})")
        ratios.append(f"{quant}: " + ", ".join(parts))
    for dtype in ("bfloat16", "float32"):
        rs = [results.get((x, f"torch-{dtype}")) for x in d]
        if all(rs):
            prefill = rs[0]["positions"] / fit(d, [r["prefill_s"] for r in rs])
            lines.append(f"| PyTorch (transformers) | {dtype} | {fit(d, [r['ttft_s'] for r in rs]):.1f} s | "
                         f"{rs[-1]['encode_s']:.2f} s | {prefill:.1f} | "
                         f"{1 / fit(d, [1 / r['decode_tok_s'] for r in rs]):.2f} | – | – | – | "
                         f"{fit(d, [r['peak_rss_kib'] / 1024**2 for r in rs]):.2f} GiB | – |")
    table = "\n".join(lines) + ("\n\nRatios: " + "; ".join(ratios) if ratios else "")
    depth_text = (f"all {d[0]} Qwen2-7B layers, measured (nothing extrapolated)" if d[0] == d[1] else
                  f"Qwen2-7B layers at depths {d[0]} and {d[1]} fitted linearly and extrapolated to 28 layers (→28L)")
    repeat = getattr(args, "repeat", 1)
    notes = (f"Random weights, real shapes: CLIP ViT-L/14-336 + projector in full, {depth_text}. "
             + (f"Median of {repeat} runs, the contenders alternating. " if repeat > 1 else "") +
             f"{args.threads} threads for every contender. Copy bandwidth measured in the same run: {bw:.1f} GB/s"
             + (f", fp32 sgemm peak (numpy's BLAS, same threads, best of {rates.get('sgemm_measurements', 1)} "
                f"measurements through the run) {peak:.0f} GFLOP/s" if peak else "") + "; "
             "the decode bound is that over the "
             "weights' size. Turn 2 is a 15-token follow-up on the kept context (positions evaluated in brackets), "
             "best of two; \"start pre-filled\" is the same follow-up after `prefill_next_turn()` evaluated what every "
             "follow-up starts with (the REPL does it while the user types), alternating with the plain one in the "
             "same process. Every answer is steered through a real answer's tokens (random weights' answers do not "
             "re-tokenize as generated, and a trained model's do). The cached column is a new process "
             "restoring the image prefix from disk. llama.cpp's TTFT is llama-mtmd-cli's image encode time plus the "
             "prompt positions at llama-bench's pp600 rate; its decode column is llama-bench tg32.")
    if args.no_append:
        print(table + "\n\n" + notes)
    else:
        append(args.title, f"`.venv/bin/just bench-runtime` (= `{invocation()}`)", table, notes)


if __name__ == "__main__":
    main()
