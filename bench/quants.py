"""Low-bit quants at HuatuoGPT-Vision's real shapes: sizes, memory, time, and quality against F16 (issue 24).

    .venv/bin/python bench/quants.py sizes
        llama.cpp's own figures at full depth, in seconds: each quant's file (its quantizer's dry run on a
        GGUF of the real shapes whose data is a hole) and the compute buffers of a default context (its
        no-alloc load). models/registry.py holds them; tests/test_sizing.py checks them.

    .venv/bin/python bench/quants.py quality --shape 7b --depth 2
        Random weights at the real widths, `--depth` layers: an F16 conversion; importance matrices from
        the bundled calibration with its images (image+text) and without them (text-only), each timed
        and measured; every quant made without a matrix (where llama.cpp allows), with the text-only one
        and with the image+text one; each measured against F16 exactly as `huatuo-local verify
        --reference` does (six held-out medical prompts, the reference's answer fed back: KL divergence
        and top-1 agreement per position). With llama.cpp's tools (built with the engine),
        llama-quantize is given our matrix file too and its output compared byte for byte with ours.
        Times at full depth are extrapolated: quantizing per tensor (the layers' share scaled by depth),
        the matrix by the forward pass's arithmetic.

Random weights show what quantizing does to *these* numbers; they cannot show how a trained model's
outlier columns (what an importance matrix is for) respond. Users with the real weights run
`huatuo-local verify --reference NAME:f16 NAME:iq3_xxs ...` for the real figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from common import append, invocation, run_measured  # noqa: E402
from huatuo_local.models.registry import KNOWN_MODELS, LlmShape  # noqa: E402

SHAPES = {"7b": KNOWN_MODELS["huatuo-vision-7b"], "34b": KNOWN_MODELS["huatuo-vision-34b"]}
QUANTS = ("Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_XS")
SIZED = ("F16", "Q8_0", "Q6_K", "Q5_K_M", *QUANTS)
VH, VFFN, VLAYERS, VHEADS = 1024, 4096, 24, 16  # CLIP ViT-L/14-336
CTX = 8192
GIB = 1024**3


# --- sizes ---------------------------------------------------------------------------------------------

def sizes(args) -> None:
    from huatuo_local.convert.quantize import quantized_size
    from real_shapes import planned_compute_bytes, write_sparse_llm

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    lines = ["| model | " + " | ".join(SIZED) + " | compute, CPU (ubatch 256) | compute, GPU (ubatch 512) |",
             "|---|" + "---|" * (len(SIZED) + 2)]
    literal = {}
    for key, known in SHAPES.items():
        path = write_sparse_llm(work / f"sparse-{key}.gguf", known.shape)
        try:
            got = {q: quantized_size(path, q) for q in SIZED}
            cpu, gpu = planned_compute_bytes(path, CTX, 256), planned_compute_bytes(path, CTX, 512)
        finally:
            path.unlink()
        literal[known.name] = {"llm_bytes": got, "compute_bytes_cpu": cpu, "compute_bytes_gpu": gpu}
        lines.append(f"| {known.name} | " + " | ".join(f"{got[q] / GIB:.2f}" for q in SIZED)
                     + f" | {cpu / GIB:.2f} | {gpu / GIB:.2f} |")
    table = "\n".join(lines)
    print(json.dumps(literal, indent=1))
    if args.no_append:
        print(table)
        return
    append("Quant sizes at full depth (llama.cpp's dry run), GiB", invocation(), table,
           "Each LLM file as llama.cpp's quantizer sizes it from the real shapes (no weights needed); the compute "
           "buffers llama.cpp plans for an 8192-position context (no flash attention), the LM head's output "
           "included. models/registry.py holds these figures; tests/test_sizing.py re-derives them.")


# --- a random checkpoint at the real widths -----------------------------------------------------------

def _write_st(path: Path, tensors: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """Safetensors in BF16, one tensor generated at a time (normal, std 0.02; norms 1)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, shape in tensors.items():
            if name.endswith(".weight") and ("norm" in name or "layrnorm" in name):
                values = np.ones(shape, np.float32)  # normalisation scales
            else:
                values = rng.standard_normal(shape, dtype=np.float32) * (0.002 if name.endswith(".bias") else 0.02)
            bits = values.view(np.uint32)
            f.write(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes())


def _llm_tensors(s: LlmShape, depth: int) -> dict[str, tuple[int, ...]]:
    kv = s.n_embd // s.n_head * s.n_head_kv
    t = {"model.embed_tokens.weight": (s.n_vocab, s.n_embd)}
    for i in range(depth):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (s.n_embd,), p + "post_attention_layernorm.weight": (s.n_embd,),
                  p + "self_attn.q_proj.weight": (s.n_embd, s.n_embd), p + "self_attn.k_proj.weight": (kv, s.n_embd),
                  p + "self_attn.v_proj.weight": (kv, s.n_embd), p + "self_attn.o_proj.weight": (s.n_embd, s.n_embd),
                  p + "mlp.gate_proj.weight": (s.n_ff, s.n_embd), p + "mlp.up_proj.weight": (s.n_ff, s.n_embd),
                  p + "mlp.down_proj.weight": (s.n_embd, s.n_ff)})
        if s.qkv_bias:
            t.update({p + "self_attn.q_proj.bias": (s.n_embd,), p + "self_attn.k_proj.bias": (kv,),
                      p + "self_attn.v_proj.bias": (kv,)})
    t["model.norm.weight"] = (s.n_embd,)
    t["lm_head.weight"] = (s.n_vocab, s.n_embd)
    return t


def _clip_tensors(h: int) -> dict[str, tuple[int, ...]]:
    v = "model.vision_tower.vision_tower.vision_model."
    t = {"model.mm_projector.0.weight": (h, VH), "model.mm_projector.0.bias": (h,),
         "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,),
         v + "embeddings.class_embedding": (VH,), v + "embeddings.patch_embedding.weight": (VH, 3, 14, 14),
         v + "embeddings.position_embedding.weight": (577, VH), v + "pre_layrnorm.weight": (VH,),
         v + "pre_layrnorm.bias": (VH,), v + "post_layernorm.weight": (VH,), v + "post_layernorm.bias": (VH,)}
    for i in range(VLAYERS):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{proj}.weight"], t[p + f"self_attn.{proj}.bias"] = (VH, VH), (VH,)
        for ln in ("layer_norm1", "layer_norm2"):
            t[p + f"{ln}.weight"], t[p + f"{ln}.bias"] = (VH,), (VH,)
        t.update({p + "mlp.fc1.weight": (VFFN, VH), p + "mlp.fc1.bias": (VFFN,), p + "mlp.fc2.weight": (VH, VFFN),
                  p + "mlp.fc2.bias": (VH,)})
    return t


def write_checkpoint(folder: Path, s: LlmShape, depth: int) -> Path:
    """A LLaVA checkpoint of `s`'s widths and `depth` layers, the real CLIP tower's shapes, random weights;
    the real Qwen2 vocabulary for the 7B, a small SentencePiece one (rows padded) for the 34B."""
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(depth * 1000 + s.n_embd)
    llm, clip = _llm_tensors(s, depth), _clip_tensors(s.n_embd)
    _write_st(folder / "model-00001-of-00002.safetensors", llm, rng)
    _write_st(folder / "model-00002-of-00002.safetensors", clip, rng)
    weight_map = {n: "model-00001-of-00002.safetensors" for n in llm}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in clip})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    qwen = s.arch == "qwen2"
    config = {"architectures": ["LlavaQwen2ForCausalLM" if qwen else "LlavaLlamaForCausalLM"],
              "model_type": "llava_qwen2" if qwen else "llava_llama", "hidden_size": s.n_embd,
              "intermediate_size": s.n_ff, "num_hidden_layers": depth, "num_attention_heads": s.n_head,
              "num_key_value_heads": s.n_head_kv, "vocab_size": s.n_vocab, "rope_theta": 1e6 if qwen else 5e6,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 32768 if qwen else 4096, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "hidden_act": "silu", "mm_hidden_size": VH,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "bos_token_id": None if qwen else 1, "eos_token_id": None if qwen else 2}
    if VH != 1024:  # --tiny: not the named tower's shapes
        config["vision_config"] = {"hidden_size": VH, "intermediate_size": VFFN, "num_hidden_layers": VLAYERS,
                                   "num_attention_heads": VHEADS, "image_size": 336, "patch_size": 14}
    (folder / "config.json").write_text(json.dumps(config))
    if qwen:
        import qwen_vocab

        tok = folder.parent / "qwen-tokenizer"
        if not tok.is_dir():
            qwen_vocab.build(tok)
        for f in tok.iterdir():
            shutil.copy(f, folder / f.name)
    else:
        from tiny_models import write_spm_tokenizer

        write_spm_tokenizer(folder, 664)
    return folder


# --- quality, time and memory --------------------------------------------------------------------------

MATRIX = """
import sys, time
from pathlib import Path
from huatuo_local.models.imatrix import write_imatrix
from huatuo_local.runtime.quantize import calibration, imatrix
text_only = {text_only}
conversations = calibration.bundled(text_only=text_only)
t = time.perf_counter()
m = imatrix.compute(Path({llm!r}), Path({mmproj!r}), conversations, threads={threads},
                    label=calibration.describe(conversations, calibration.BUNDLED_NAME))
seconds = time.perf_counter() - t
write_imatrix(Path({out!r}), m)
print('{{"seconds": %f, "positions": %d}}' % (seconds, m.counts["blk.0.attn_q.weight"]))
"""

QUANTIZE = """
import json, time
from pathlib import Path
from huatuo_local.convert.quantize import quantize_gguf
from huatuo_local.models.imatrix import read_imatrix
marks = []
means = read_imatrix(Path({matrix!r})).means() if {matrix!r} else None
t = time.perf_counter()
quantize_gguf(Path({src!r}), Path({dst!r}), {quant!r}, {threads}, lambda d, n: marks.append((d, time.perf_counter())),
              means)
end = time.perf_counter()
print(json.dumps({{"seconds": end - t, "start": t, "end": end, "marks": marks}}))
"""


def _tensor_seconds(result: dict, names: list[str]) -> dict[str, float]:
    """Each tensor's quantizing time from the quantizer's `[i/N]` progress marks (one as each tensor starts)."""
    starts = {d: t for d, t in result["marks"]}
    out = {}
    for i, name in enumerate(names, start=1):
        begin = starts.get(i)
        finish = starts.get(i + 1, result["end"])
        if begin is not None:
            out[name] = finish - begin
    return out


def _full_depth_seconds(per_tensor: dict[str, float], depth: int, n_layer: int) -> float:
    layers = sum(t for n, t in per_tensor.items() if n.startswith("blk."))
    return sum(per_tensor.values()) - layers + layers * n_layer / depth


def _forward_flops(s: LlmShape, layers: int, positions: int) -> float:
    kv = s.n_embd // s.n_head * s.n_head_kv
    per_layer = 2 * s.n_embd * s.n_embd + 2 * s.n_embd * kv + 3 * s.n_embd * s.n_ff
    clip = 2 * VLAYERS * (4 * VH * VH + 2 * VH * VFFN) * 577
    return clip + 2 * positions * (layers * per_layer + s.n_vocab * s.n_embd)


def _variant_manifest(f16_manifest: Path, llm: Path, quant: str) -> Path:
    from huatuo_local.models.manifest import Manifest

    m = Manifest.read(f16_manifest)
    m.llm_file, m.quant, m.llm_sha256 = llm.name, quant, ""
    out = llm.with_name(llm.name[: -len(".gguf")] + ".manifest.json")
    m.write(out)
    return out


def _tiny():
    """Small shapes with 256-wide rows (what the IQ quants need), to keep the script working in tests."""
    from huatuo_local.models.registry import KnownModel

    global VH, VFFN, VLAYERS, VHEADS
    VH, VFFN, VLAYERS, VHEADS = 64, 128, 2, 2
    return KnownModel("tiny", "", "", "llama", "Q4_K_M", LlmShape("llama", 4, 256, 512, 4, 2, 704, False))


def quality(args) -> None:
    from gguf import GGUFReader
    from huatuo_local.convert.pipeline import convert
    from huatuo_local.convert.quantize import NEEDS_IMATRIX
    from huatuo_local.runtime.core.config import ModelConfig
    from huatuo_local.runtime.quantize.calibration import held_out
    from huatuo_local.runtime.verify.quants import Prompt, compare_quants

    known = SHAPES[args.shape] if not args.tiny else _tiny()
    s, depth = known.shape, args.depth
    work = Path(args.workdir) / f"{args.shape}-d{depth}"
    ckpt = write_checkpoint(work / "ckpt", s, depth)
    folder = work / "gguf"
    f16_manifest = folder / "m-F16.manifest.json"
    if not f16_manifest.is_file():
        t = time.perf_counter()
        convert(ckpt, folder, quant="F16", mmproj_type="f16", name="m")
        print(f"F16 conversion: {time.perf_counter() - t:.0f} s", flush=True)
    llm, mmproj = folder / "m-F16.gguf", folder / "mmproj-m-f16.gguf"
    names = [t.name for t in GGUFReader(str(llm)).tensors]
    matrices, rows_time = {}, []
    for kind in ("image+text", "text-only"):
        out = folder / f"m-{kind.replace('+', '-')}.imatrix.gguf"
        r = run_measured(MATRIX.format(text_only=kind == "text-only", llm=str(llm), mmproj=str(mmproj),
                                       threads=args.threads, out=str(out)))
        positions = r["positions"]
        scale = _forward_flops(s, s.n_layer, positions) / _forward_flops(s, depth, positions)
        f16_full = known.llm_bytes.get("F16", 0) or llm.stat().st_size
        rows_time.append(f"| importance matrix, {kind} (14 conversations, {positions} positions) | "
                         f"{r['seconds']:.0f} s | {r['seconds'] * scale / 60:.0f} min | "
                         f"{r['peak_rss_kib'] / 1024**2:.1f} GiB | "
                         f"{(r['peak_rss_kib'] * 1024 - llm.stat().st_size + f16_full) / GIB:.0f} GiB |")
        matrices[kind] = out
        print(rows_time[-1], file=sys.stderr, flush=True)  # progress; the table goes to stdout once, at the end
    variants = []
    for quant in args.quants:
        for kind in (None, "text-only", "image+text"):
            if kind is None and quant in NEEDS_IMATRIX:
                continue
            tag = {None: "none", "text-only": "text", "image+text": "image"}[kind]
            dst = folder / f"m-{quant}-{tag}.gguf"
            r = run_measured(QUANTIZE.format(matrix=str(matrices[kind]) if kind else "", src=str(llm), dst=str(dst),
                                             quant=quant, threads=args.threads))
            full = _full_depth_seconds(_tensor_seconds(r, names), depth, s.n_layer)
            if kind != "text-only":
                rows_time.append(f"| quantize {quant}{' with a matrix' if kind else ''} | {r['seconds']:.0f} s | "
                                 f"{full / 60:.1f} min | {r['peak_rss_kib'] / 1024**2:.1f} GiB | – |")
                print(rows_time[-1], file=sys.stderr, flush=True)
            variants.append((quant, kind or "none", _variant_manifest(f16_manifest, dst, quant)))
    peer = _peer_check(llm, matrices["image+text"], folder, args.threads)
    prompts = [Prompt([c.image] if c.image else [], c.question) for c in held_out()]
    rows = compare_quants(f16_manifest, [v[2] for v in variants], prompts, args.tokens,
                          ModelConfig(threads=args.threads))
    quality_lines = ["| quant | matrix | KL mean | KL max | top-1 agreement | positions |", "|---|---|---|---|---|---|"]
    for (quant, kind, _), row in zip(variants, rows):
        quality_lines.append(f"| {quant} | {kind} | {row.kl_mean:.4f} | {row.kl_max:.4f} | "
                             f"{row.top1_agreement * 100:.1f}% | {row.positions} |")
    table = ("| step | at depth " + str(depth) + " | full depth (extrapolated) | peak RSS | peak RSS, full depth |\n"
             "|---|---|---|---|---|\n" + "\n".join(rows_time) + "\n\n" + "\n".join(quality_lines))
    if args.no_append:
        print(table, flush=True)
        return
    append(f"Low-bit quants at {known.shape.arch} {args.shape.upper()} widths, {depth} layer(s), random weights",
           invocation(), table,
           f"Quality: against the F16 conversion of the same random weights, `huatuo-local verify --reference`'s "
           f"measure (six held-out prompts, {args.tokens} answer tokens each, teacher-forced). {peer} Matrix time "
           "at full depth scales the measured time by the forward pass's arithmetic (CLIP, every layer, the LM head "
           "at every position); its memory at full depth adds the whole F16 model, which the calibration maps "
           "and reads. Quantizing time at full depth scales the layers' measured per-tensor times by depth.")


def _peer_check(llm: Path, matrix: Path, folder: Path, threads: int) -> str:
    """llama-quantize --imatrix OUR_FILE and our quantizer, same input and quant: the same bytes?"""
    import llama_tools
    from gguf import GGUFReader
    from huatuo_local.convert.quantize import quantize_gguf
    from huatuo_local.models.imatrix import read_imatrix

    bin_dir = llama_tools.tools_dir()
    if not (bin_dir / "llama-quantize").is_file():
        return "llama-quantize is missing (it is built with the engine: scripts/bootstrap.py): no byte-for-byte check."
    ours, theirs = folder / "peer-ours.gguf", folder / "peer-llama.gguf"
    quantize_gguf(llm, ours, "IQ3_XXS", threads, None, read_imatrix(matrix).means())
    llama_tools.run_tool(bin_dir, "llama-quantize", "--imatrix", str(matrix), str(llm), str(theirs), "IQ3_XXS",
                         str(threads))
    a = {t.name: np.asarray(t.data) for t in GGUFReader(str(ours)).tensors}
    b = {t.name: np.asarray(t.data) for t in GGUFReader(str(theirs)).tensors}
    same = a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    ours.unlink()
    theirs.unlink()
    return ("llama.cpp's `llama-quantize --imatrix` reads our image+text matrix file and makes the same IQ3_XXS "
            "tensors, byte for byte, as our converter." if same else
            "WARNING: llama-quantize given our matrix made different IQ3_XXS tensors than our converter.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    sz = sub.add_parser("sizes")
    sz.add_argument("--workdir", default="/tmp/huatuo-bench-quants")
    sz.add_argument("--no-append", action="store_true", help="print the table only (not into BENCHMARKS.md)")
    q = sub.add_parser("quality")
    q.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    q.add_argument("--no-append", action="store_true", help="print the tables only (not into BENCHMARKS.md)")
    q.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    q.add_argument("--depth", type=int, default=2)
    q.add_argument("--quants", nargs="+", default=list(QUANTS))
    q.add_argument("--tokens", type=int, default=16)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--workdir", default="/tmp/huatuo-bench-quants")
    args = ap.parse_args()
    sizes(args) if args.step == "sizes" else quality(args)


if __name__ == "__main__":
    main()
