"""Tiny seeded HuatuoGPT-Vision checkpoints in the release's exact layouts.

Dimensions are small but keep every structural trait that matters to llama.cpp: CLIP's
FFN width differs from its hidden width (clip.cpp guesses fc1/fc2 from shapes), the
vocabulary is smaller than the embedding matrix (padding rows), Qwen2 has q/k/v biases,
the Llama layout has grouped KV heads (rotary permutation by KV heads), 336 px / 14 px
patches give the real 576 image tokens.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The reference tokenizers take Qwen2's pre-tokenizer from transformers, not from huatuo-local: a test
# must not check the converter's regex against itself.
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_REGEX

CORPUS = """The chest radiograph shows a right lower lobe consolidation consistent with pneumonia.
No pleural effusion or pneumothorax is seen. The cardiac silhouette is within normal limits.
The CT scan of the abdomen demonstrates a hypodense lesion in the liver measuring 2.3 cm.
MRI of the brain reveals no acute infarct, hemorrhage or mass effect. What does the picture show?
Histopathology: the biopsy shows well differentiated adenocarcinoma with glandular formation.
Is there any abnormality in this image? Describe the findings. Which organ is shown here?
胸部X光片显示右下肺实变，符合肺炎表现。未见胸腔积液或气胸。请描述这张图片。
患者男性，65岁，咳嗽三周。CT显示肝脏低密度病灶。这是什么器官？
"""


@dataclass
class TinySpec:
    arch: str = "qwen2"  # "qwen2" or "llama"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    vocab_size: int = 0  # embedding rows, > tokenizer size (padding); 0: 384 (qwen2) or 704 (llama)
    v_hidden: int = 32
    v_layers: int = 3
    v_heads: int = 2
    v_ffn: int = 64
    image_size: int = 336
    patch: int = 14
    dtype: str = "F32"  # F32, F16, BF16
    tower: str = "inside"  # inside, folder, folder_abs, separate (needs --vision-tower), repo_named
    tower_prefix: bool = True  # `vision_model.` inside names (transformers < 5)
    shards: int = 1
    seed: int = 0
    weight_scale: float = 1.0
    extra_config: dict = field(default_factory=dict)
    tokenizer_from: str = ""  # a folder whose tokenizer files replace the trained one


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    bits = a.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def store(a: np.ndarray, dtype: str) -> tuple[str, bytes, np.ndarray]:
    """(safetensors dtype, bytes, the f32 values actually stored)."""
    a = a.astype(np.float32)
    if dtype == "F32":
        return "F32", a.tobytes(), a
    if dtype == "F16":
        h = a.astype(np.float16)
        return "F16", h.tobytes(), h.astype(np.float32)
    bits = _bf16_bits(a)
    return "BF16", bits.tobytes(), (bits.astype(np.uint32) << 16).view(np.float32).reshape(a.shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    header, blobs, stored, offset = {}, [], {}, 0
    for name, arr in tensors.items():
        st, raw, values = store(arr, dtype if arr.ndim > 1 or dtype != "F32" else "F32")
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        stored[name] = values
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)
    return stored


def llm_tensors(s: TinySpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    hd = s.hidden // s.heads
    t: dict[str, np.ndarray] = {}

    def w(*shape: int, scale: float = 1.0) -> np.ndarray:
        fan_in = shape[-1]
        return (rng.standard_normal(shape) * scale * s.weight_scale / np.sqrt(fan_in)).astype(np.float32)

    t["model.embed_tokens.weight"] = w(s.vocab_size, s.hidden, scale=8.0)
    for i in range(s.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(s.hidden)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(s.hidden)).astype(np.float32)
        t[p + "self_attn.q_proj.weight"] = w(s.heads * hd, s.hidden, scale=2.0)
        t[p + "self_attn.k_proj.weight"] = w(s.kv_heads * hd, s.hidden, scale=2.0)
        t[p + "self_attn.v_proj.weight"] = w(s.kv_heads * hd, s.hidden)
        if s.arch == "qwen2":
            t[p + "self_attn.q_proj.bias"] = (0.1 * rng.standard_normal(s.heads * hd)).astype(np.float32)
            t[p + "self_attn.k_proj.bias"] = (0.1 * rng.standard_normal(s.kv_heads * hd)).astype(np.float32)
            t[p + "self_attn.v_proj.bias"] = (0.1 * rng.standard_normal(s.kv_heads * hd)).astype(np.float32)
        t[p + "self_attn.o_proj.weight"] = w(s.hidden, s.heads * hd)
        t[p + "mlp.gate_proj.weight"] = w(s.ffn, s.hidden)
        t[p + "mlp.up_proj.weight"] = w(s.ffn, s.hidden)
        t[p + "mlp.down_proj.weight"] = w(s.hidden, s.ffn)
    t["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(s.hidden)).astype(np.float32)
    t["lm_head.weight"] = w(s.vocab_size, s.hidden, scale=8.0)
    t["model.mm_projector.0.weight"] = w(s.hidden, s.v_hidden, scale=2.0)
    t["model.mm_projector.0.bias"] = (0.1 * rng.standard_normal(s.hidden)).astype(np.float32)
    t["model.mm_projector.2.weight"] = w(s.hidden, s.hidden, scale=2.0)
    t["model.mm_projector.2.bias"] = (0.1 * rng.standard_normal(s.hidden)).astype(np.float32)
    return t


def clip_tensors(s: TinySpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """CLIP vision tensors, names relative to `vision_model.`, post-LayerNorm included."""
    h, f = s.v_hidden, s.v_ffn
    n_pos = (s.image_size // s.patch) ** 2 + 1
    t: dict[str, np.ndarray] = {
        "embeddings.class_embedding": rng.standard_normal(h).astype(np.float32),
        "embeddings.patch_embedding.weight": (rng.standard_normal((h, 3, s.patch, s.patch)) * 0.05).astype(np.float32),
        "embeddings.position_embedding.weight": (rng.standard_normal((n_pos, h)) * 0.5).astype(np.float32),
        "pre_layrnorm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
        "pre_layrnorm.bias": (0.1 * rng.standard_normal(h)).astype(np.float32),
        "post_layernorm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
        "post_layernorm.bias": (0.1 * rng.standard_normal(h)).astype(np.float32),
    }
    for i in range(s.v_layers):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{proj}.weight"] = (rng.standard_normal((h, h)) / np.sqrt(h)).astype(np.float32)
            t[p + f"self_attn.{proj}.bias"] = (0.1 * rng.standard_normal(h)).astype(np.float32)
        for ln in ("layer_norm1", "layer_norm2"):
            t[p + f"{ln}.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
            t[p + f"{ln}.bias"] = (0.1 * rng.standard_normal(h)).astype(np.float32)
        t[p + "mlp.fc1.weight"] = (rng.standard_normal((f, h)) / np.sqrt(h)).astype(np.float32)
        t[p + "mlp.fc1.bias"] = (0.1 * rng.standard_normal(f)).astype(np.float32)
        t[p + "mlp.fc2.weight"] = (rng.standard_normal((h, f)) / np.sqrt(f)).astype(np.float32)
        t[p + "mlp.fc2.bias"] = (0.1 * rng.standard_normal(h)).astype(np.float32)
    return t


def clip_config(s: TinySpec) -> dict:
    return {
        "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
        "hidden_size": s.v_hidden, "intermediate_size": s.v_ffn, "num_hidden_layers": s.v_layers,
        "num_attention_heads": s.v_heads, "image_size": s.image_size, "patch_size": s.patch,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": s.v_hidden, "num_channels": 3,
    }


PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": {"shortest_edge": 336}, "image_processor_type": "CLIPImageProcessor",
}


def write_bpe_tokenizer(folder: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "model_max_length": 32768, "clean_up_tokenization_spaces": False,
    }))


def write_spm_tokenizer(folder: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<|startoftext|>", eos_piece="<|endoftext|>",
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<unk>", "pad_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
        "legacy": True, "model_max_length": 4096,
    }))


def make_checkpoint(root: Path, s: TinySpec) -> dict:
    """Write a checkpoint under root/ckpt; return what a test needs to know about it."""
    if not s.vocab_size:
        s.vocab_size = 384 if s.arch == "qwen2" else 704
    rng = np.random.default_rng(s.seed)
    ckpt = root / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    llm = llm_tensors(s, rng)
    clip = clip_tensors(s, rng)
    config = {
        "architectures": ["LlavaQwen2ForCausalLM" if s.arch == "qwen2" else "LlavaLlamaForCausalLM"],
        "model_type": "llava_qwen2" if s.arch == "qwen2" else "llava_llama",
        "hidden_size": s.hidden, "intermediate_size": s.ffn, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab_size,
        "rope_theta": 1000000.0 if s.arch == "qwen2" else 5000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[s.dtype],
        "mm_hidden_size": s.v_hidden, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "bos_token_id": None if s.arch == "qwen2" else 1, "eos_token_id": None,
    }
    tower_dir = None
    all_tensors = dict(llm)
    if s.tower == "inside":
        prefix = "model.vision_tower.vision_tower." + ("vision_model." if s.tower_prefix else "")
        all_tensors.update({prefix + k: v for k, v in clip.items()})
        config["mm_vision_tower"] = "tiny-clip-not-downloadable"
        config["vision_config"] = clip_config(s)
    else:
        if s.tower == "folder":
            tower_dir = ckpt / "vit" / "tiny_clip"
            config["mm_vision_tower"] = "vit/tiny_clip"
        elif s.tower == "folder_abs":
            tower_dir = root / "towers" / "tiny_clip"
            config["mm_vision_tower"] = str(tower_dir)
        else:  # "separate": the config names a tower that is nowhere to be found
            tower_dir = root / "elsewhere" / "tiny_clip"
            config["mm_vision_tower"] = "/nonexistent/tiny_clip"
        tower_dir.mkdir(parents=True, exist_ok=True)
        prefix = "vision_model." if s.tower_prefix else ""
        tower_stored = write_safetensors(tower_dir / "model.safetensors",
                                         {prefix + k: v for k, v in clip.items()}, s.dtype)
        (tower_dir / "config.json").write_text(json.dumps(clip_config(s)))
        (tower_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    config.update(s.extra_config)
    (ckpt / "config.json").write_text(json.dumps(config, indent=1))
    (ckpt / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.2}))

    names = list(all_tensors)
    stored: dict[str, np.ndarray] = {}
    if s.shards == 1:
        stored.update(write_safetensors(ckpt / "model.safetensors", all_tensors, s.dtype))
    else:
        weight_map = {}
        per = -(-len(names) // s.shards)
        for i in range(s.shards):
            fname = f"model-{i + 1:05d}-of-{s.shards:05d}.safetensors"
            part = {n: all_tensors[n] for n in names[i * per:(i + 1) * per]}
            stored.update(write_safetensors(ckpt / fname, part, s.dtype))
            weight_map.update({n: fname for n in part})
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if s.tower != "inside":
        stored.update({"vision_model." + k: v for k, v in tower_stored.items()} if not s.tower_prefix
                      else tower_stored)
    if s.tokenizer_from:
        import shutil

        for f in Path(s.tokenizer_from).iterdir():
            shutil.copy(f, ckpt / f.name)
    elif s.arch == "qwen2":
        write_bpe_tokenizer(ckpt)
    else:
        write_spm_tokenizer(ckpt, s.vocab_size - 40)
    return {"ckpt": ckpt, "tower_dir": tower_dir, "stored": stored, "config": config, "spec": s}


def clip_stored(info: dict) -> dict[str, np.ndarray]:
    """The tower tensors as stored, keyed relative to `vision_model.`."""
    out = {}
    for name, arr in info["stored"].items():
        for prefix in ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower.",
                       "vision_model."):
            if name.startswith(prefix):
                out[name[len(prefix):]] = arr
                break
    return out
