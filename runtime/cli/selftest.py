"""`huatuo-local doctor --selftest`: prove an install end to end with no download.

Writes a tiny random HuatuoGPT-Vision-layout checkpoint (Qwen2 backbone, byte-level BPE
vocabulary, CLIP tower inside), converts it with the real converter, and chats about a
synthetic image through the real engine, on the GPU when offload is available. The answers
are meaningless: the weights are random.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huatuo_local.models.bytelevel import QWEN2_PRETOKENIZER_REGEX as QWEN2_REGEX
from huatuo_local.models.bytelevel import bytes_to_unicode
from huatuo_local.models.towers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from PIL import Image


@dataclass
class SelftestResult:
    answer: str
    tokens: int
    gpu_layers: int
    seconds: float


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for b in blobs:
            f.write(b)


# Long: one file written key by key, in the file's own order; split up, the layout would be harder to read.
def write_random_checkpoint(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    h, layers, ffn, vh, vffn, vlayers = 64, 2, 128, 32, 64, 3
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    eos = len(vocab)
    n_vocab = 320

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-1])

    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": w(n_vocab, h) * 4, "lm_head.weight": w(n_vocab, h) * 4,
                                "model.norm.weight": np.ones(h, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(h, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(h, np.float32),
                  p + "mlp.gate_proj.weight": w(ffn, h), p + "mlp.up_proj.weight": w(ffn, h),
                  p + "mlp.down_proj.weight": w(h, ffn), p + "self_attn.o_proj.weight": w(h, h)})
        for x in "qkv":
            t[p + f"self_attn.{x}_proj.weight"] = w(h, h)
            t[p + f"self_attn.{x}_proj.bias"] = np.zeros(h, np.float32)
    t.update({"model.mm_projector.0.weight": w(h, vh), "model.mm_projector.0.bias": np.zeros(h, np.float32),
              "model.mm_projector.2.weight": w(h, h), "model.mm_projector.2.bias": np.zeros(h, np.float32)})
    v = "model.vision_tower.vision_tower.vision_model."
    t.update({v + "embeddings.class_embedding": w(vh), v + "embeddings.patch_embedding.weight": w(vh, 3, 14, 14),
              v + "embeddings.position_embedding.weight": w(577, vh),
              v + "pre_layrnorm.weight": np.ones(vh, np.float32), v + "pre_layrnorm.bias": np.zeros(vh, np.float32)})
    for i in range(vlayers):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{proj}.weight"] = w(vh, vh)
            t[p + f"self_attn.{proj}.bias"] = np.zeros(vh, np.float32)
        for ln in ("layer_norm1", "layer_norm2"):
            t[p + f"{ln}.weight"] = np.ones(vh, np.float32)
            t[p + f"{ln}.bias"] = np.zeros(vh, np.float32)
        t.update({p + "mlp.fc1.weight": w(vffn, vh), p + "mlp.fc1.bias": np.zeros(vffn, np.float32),
                  p + "mlp.fc2.weight": w(vh, vffn), p + "mlp.fc2.bias": np.zeros(vh, np.float32)})
    folder.mkdir(parents=True, exist_ok=True)
    _write_safetensors(folder / "model.safetensors", t)
    config = {
        "architectures": ["LlavaQwen2ForCausalLM"], "model_type": "llava_qwen2", "hidden_size": h,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": n_vocab, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "mm_hidden_size": vh, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
        "mm_vision_tower": "random-selftest-tower",
        "vision_config": {"hidden_size": vh, "intermediate_size": vffn, "num_hidden_layers": vlayers,
                          "num_attention_heads": 2, "image_size": 336, "patch_size": 14},
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = {
        "version": "1.0", "added_tokens": [{"id": eos, "content": "<|endoftext|>", "special": True,
                                            "single_word": False, "lstrip": False, "rstrip": False,
                                            "normalized": False}],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "crop_size": 336}))
    return folder


def run(n_gpu_layers: int | None = None) -> SelftestResult:
    from huatuo_local.convert.pipeline import convert
    from huatuo_local.runtime.api import HuatuoChatbot
    from huatuo_local.runtime.llama.devices import local_gpus

    start = time.perf_counter()
    ngl = (-1 if local_gpus() else 0) if n_gpu_layers is None else n_gpu_layers  # a tiny model fits any GPU
    with tempfile.TemporaryDirectory(prefix="huatuo-selftest-") as tmp:
        root = Path(tmp)
        ckpt = write_random_checkpoint(root / "checkpoint")
        result = convert(ckpt, root / "model", quant="Q8_0", mmproj_type="f16", name="selftest")
        image = root / "scan.png"
        rng = np.random.default_rng(1)
        Image.fromarray((rng.random((240, 320, 3)) * 255).astype(np.uint8)).save(image)
        with HuatuoChatbot(result.manifest_path, n_gpu_layers=ngl, temperature=0, max_new_tokens=16) as bot:
            answer = bot.chat("What does the picture show?", [image])
            tokens = len(bot.last_reply.tokens)
    return SelftestResult(answer, tokens, ngl, time.perf_counter() - start)
