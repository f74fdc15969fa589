"""Converter throughput and peak memory, on synthetic checkpoints with HuatuoGPT-Vision-7B's real shapes.

Two depths (default 2 and 4 layers of Qwen2-7B's shapes, plus the full-size embeddings, LM head
and CLIP ViT-L/14-336 tower) show that the peak does not grow with depth. llama.cpp's own
`convert_hf_to_gguf.py` (from the llama-cpp-python source distribution) converts the same LLM
weights side by side. Output types are F16 (direct writes, no quantizer) on both sides.

    .venv/bin/python bench/convert.py [--depths 2 4] [--workdir /tmp/huatuo-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import ROOT, append, invocation, run_measured  # noqa: E402

H, FFN, HEADS, KV, VOCAB = 3584, 18944, 28, 4, 152064
VH, VFFN, VLAYERS = 1024, 4096, 24


def bf16_block(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random-looking bf16 bits without generating every value (a tiled random block)."""
    n = int(np.prod(shape))
    block = (rng.standard_normal(1 << 16).astype(np.float32) * 0.02).view(np.uint32) >> 16
    return np.resize(block.astype(np.uint16), n).reshape(shape)


def write_st(path: Path, tensors: dict[str, tuple[tuple[int, ...], str]], rng) -> int:
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        size = int(np.prod(shape)) * (2 if dtype == "BF16" else 4)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for _name, (shape, dtype) in tensors.items():
            if dtype == "BF16":
                f.write(bf16_block(shape, rng).tobytes())
            else:
                f.write((1 + 0.01 * rng.standard_normal(shape)).astype(np.float32).tobytes())
    return offset


def llm_tensors(layers: int) -> dict[str, tuple[tuple[int, ...], str]]:
    t = {"model.embed_tokens.weight": ((VOCAB, H), "BF16")}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": ((H,), "BF16"), p + "post_attention_layernorm.weight": ((H,), "BF16"),
            p + "self_attn.q_proj.weight": ((H, H), "BF16"), p + "self_attn.q_proj.bias": ((H,), "BF16"),
            p + "self_attn.k_proj.weight": ((KV * H // HEADS, H), "BF16"),
            p + "self_attn.k_proj.bias": ((KV * H // HEADS,), "BF16"),
            p + "self_attn.v_proj.weight": ((KV * H // HEADS, H), "BF16"),
            p + "self_attn.v_proj.bias": ((KV * H // HEADS,), "BF16"),
            p + "self_attn.o_proj.weight": ((H, H), "BF16"), p + "mlp.gate_proj.weight": ((FFN, H), "BF16"),
            p + "mlp.up_proj.weight": ((FFN, H), "BF16"), p + "mlp.down_proj.weight": ((H, FFN), "BF16"),
        })
    t["model.norm.weight"] = ((H,), "BF16")
    t["lm_head.weight"] = ((VOCAB, H), "BF16")
    return t


def mm_tensors() -> dict[str, tuple[tuple[int, ...], str]]:
    v = "model.vision_tower.vision_tower.vision_model."
    t = {"model.mm_projector.0.weight": ((H, VH), "BF16"), "model.mm_projector.0.bias": ((H,), "BF16"),
         "model.mm_projector.2.weight": ((H, H), "BF16"), "model.mm_projector.2.bias": ((H,), "BF16"),
         v + "embeddings.class_embedding": ((VH,), "BF16"),
         v + "embeddings.patch_embedding.weight": ((VH, 3, 14, 14), "BF16"),
         v + "embeddings.position_embedding.weight": ((577, VH), "BF16"),
         v + "pre_layrnorm.weight": ((VH,), "BF16"), v + "pre_layrnorm.bias": ((VH,), "BF16"),
         v + "post_layernorm.weight": ((VH,), "BF16"), v + "post_layernorm.bias": ((VH,), "BF16")}
    for i in range(VLAYERS):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{proj}.weight"] = ((VH, VH), "BF16")
            t[p + f"self_attn.{proj}.bias"] = ((VH,), "BF16")
        for ln in ("layer_norm1", "layer_norm2"):
            t[p + f"{ln}.weight"] = ((VH,), "BF16")
            t[p + f"{ln}.bias"] = ((VH,), "BF16")
        t.update({p + "mlp.fc1.weight": ((VFFN, VH), "BF16"), p + "mlp.fc1.bias": ((VFFN,), "BF16"),
                  p + "mlp.fc2.weight": ((VH, VFFN), "BF16"), p + "mlp.fc2.bias": ((VH,), "BF16")})
    return t


def config(layers: int, llava: bool) -> dict:
    c = {"architectures": ["LlavaQwen2ForCausalLM" if llava else "Qwen2ForCausalLM"],
         "model_type": "llava_qwen2" if llava else "qwen2", "hidden_size": H, "intermediate_size": FFN,
         "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": VOCAB,
         "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
         "sliding_window": 131072, "max_window_layers": 28, "use_sliding_window": False}
    if llava:
        c.update({"mm_hidden_size": VH, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
                  "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
                  "mm_vision_tower": "openai/clip-vit-large-patch14-336"})
        if VH != 1024:  # --tiny: not the named tower's shapes
            c["vision_config"] = {"hidden_size": VH, "intermediate_size": VFFN, "num_hidden_layers": VLAYERS,
                                  "num_attention_heads": 1, "image_size": 336, "patch_size": 14}
    return c


def llama_cpp_converter(work: Path) -> Path | None:
    """convert_hf_to_gguf.py and its gguf-py from the cached llama-cpp-python source distribution."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import engine_build

    sdist = engine_build.sdist_path()
    if not sdist.is_file():
        return None
    dst = work / "llama.cpp"
    if not (dst / "convert_hf_to_gguf.py").is_file():
        prefix = f"llama_cpp_python-{engine_build.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
                m.name.endswith("convert_hf_to_gguf.py") or "/conversion/" in m.name or "/gguf-py/" in m.name)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(dst, members=members, filter="data")
    return dst / "convert_hf_to_gguf.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-convert"))
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    args = ap.parse_args()
    if args.tiny:
        global H, FFN, HEADS, KV, VH, VFFN, VLAYERS
        H, FFN, HEADS, KV, VH, VFFN, VLAYERS = 256, 512, 2, 1, 64, 128, 3
    import qwen_vocab

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    tok = qwen_vocab.build(work / "tokenizer")
    rows = []
    for depth in args.depths:
        rng = np.random.default_rng(depth)
        ckpt = work / f"ckpt-{depth}"
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir()
        nbytes = write_st(ckpt / "model-00001-of-00002.safetensors", llm_tensors(depth), rng)
        nbytes += write_st(ckpt / "model-00002-of-00002.safetensors", mm_tensors(), rng)
        weight_map = {n: "model-00001-of-00002.safetensors" for n in llm_tensors(depth)}
        weight_map.update({n: "model-00002-of-00002.safetensors" for n in mm_tensors()})
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (ckpt / "config.json").write_text(json.dumps(config(depth, True)))
        for f in tok.iterdir():
            shutil.copy(f, ckpt / f.name)
        out = work / f"out-{depth}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        ours = run_measured(f"from huatuo_local.convert.pipeline import convert\n"
                            f"convert({str(ckpt)!r}, {str(out)!r}, quant='F16', mmproj_type='f16', name='b')")
        ours_s = time.perf_counter() - t0
        rows.append(("huatuo-local convert (LLM + mmproj)", depth, nbytes, ours_s, ours["peak_rss_kib"]))
        shutil.rmtree(out, ignore_errors=True)
        script = None if args.no_llama_cpp else llama_cpp_converter(work)
        if script is not None:
            plain = work / f"plain-{depth}"
            shutil.rmtree(plain, ignore_errors=True)
            plain.mkdir()
            llm_bytes = write_st(plain / "model.safetensors", llm_tensors(depth), np.random.default_rng(depth))
            (plain / "config.json").write_text(json.dumps(config(depth, False)))
            for f in tok.iterdir():
                shutil.copy(f, plain / f.name)
            t0 = time.perf_counter()
            try:
                theirs = run_measured(
                    "import runpy, sys\n"
                    f"sys.path[:0] = [{str(script.parent / 'gguf-py')!r}, {str(script.parent)!r}]\n"
                    f"sys.argv = ['convert_hf_to_gguf.py', {str(plain)!r}, '--outtype', 'f16', "
                    f"'--outfile', {str(work / 'llama-cpp.gguf')!r}]\n"
                    f"runpy.run_path({str(script)!r}, run_name='__main__')",
                )
                rows.append(("llama.cpp convert_hf_to_gguf.py (LLM only)", depth, llm_bytes,
                             time.perf_counter() - t0, theirs["peak_rss_kib"]))
            except RuntimeError as exc:
                print(f"llama.cpp converter skipped: {str(exc).splitlines()[-1]}")
            (work / "llama-cpp.gguf").unlink(missing_ok=True)
            shutil.rmtree(plain, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    table = ["| converter | layers | source | time | throughput | peak RSS |", "|---|---|---|---|---|---|"]
    for name, depth, nbytes, secs, rss in rows:
        table.append(f"| {name} | {depth} | {nbytes / 1e9:.2f} GB bf16 | {secs:.1f} s | "
                     f"{nbytes / 1e6 / secs:.0f} MB/s | {rss / 1024**2:.2f} GiB |")
    notes = ("Synthetic bf16 checkpoints with Qwen2-7B's layer shapes (hidden 3584, FFN 18944, 28/4 heads, "
             "vocabulary 152064 with the real Qwen2 tokenizer) and the full CLIP ViT-L/14-336 tower; F16 output. "
             "Time includes process start-up and the sha256 of both outputs (ours).")
    text = "\n".join(table)
    if args.no_append:
        print(text)
    else:
        append("Converter: throughput and peak memory",
               f"`.venv/bin/just bench-convert` (= `{invocation()}`)",
               text, notes)


if __name__ == "__main__":
    main()
