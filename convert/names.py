"""Hugging Face tensor names → GGUF names, with the shape each must have.

One table per part: the LLM (llama.cpp's `qwen2` / `llama` names), the CLIP tower and the
`mlp2x_gelu` projector (libmtmd's `v.*` and `mm.*` names, see clip-impl.h).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from huatuo_local.models.layout import LLMSpec
from huatuo_local.models.towers import VisionSpec

# Where a LLaVA checkpoint keeps its tower (docs/RELEASE.md, layout (a)); the inner
# `vision_model.` is absent in files written by transformers 5.
TOWER_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower.")
# A stand-alone CLIPVisionModel / CLIPModel folder (layout (b)).
FOLDER_TOWER_PREFIXES = ("vision_model.", "")
PROJECTOR_PREFIX = "model.mm_projector."

_LLM_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_CLIP_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    # fc1 expands, fc2 contracts; clip.cpp only guesses from shapes, so name them right.
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_CLIP_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED_LLM = re.compile(r"rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Mapped:
    gguf_name: str
    shape: tuple[int, ...]  # the Hugging Face (PyTorch) shape the source must have
    role: str = ""  # "q" / "k" for the llama rotary permutation


def llm_name(hf: str, spec: LLMSpec) -> Mapped | None:
    """Map one LLM tensor; None for tensors llama.cpp does not use. KeyError when unknown."""
    h, ff, hd = spec.hidden_size, spec.ffn_size, spec.head_dim
    q, kv = spec.n_head * hd, spec.n_kv_head * hd
    if hf == "model.embed_tokens.weight":
        return Mapped("token_embd.weight", (spec.vocab_size, h))
    if hf == "model.norm.weight":
        return Mapped("output_norm.weight", (h,))
    if hf == "lm_head.weight":
        return Mapped("output.weight", (spec.vocab_size, h))
    if _IGNORED_LLM.search(hf):
        return None
    m = _LAYER_RE.match(hf.removeprefix("model."))
    if not m or m.group(2) not in _LLM_LAYER:
        raise KeyError(hf)
    i, rest = int(m.group(1)), m.group(2)
    if i >= spec.n_layer:
        raise KeyError(hf)
    shapes = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
    }
    role = "q" if "q_proj" in rest else "k" if "k_proj" in rest else ""
    return Mapped(f"blk.{i}.{_LLM_LAYER[rest]}", shapes[rest], role)


def projector_name(hf: str, llm_hidden: int, mm_hidden: int) -> Mapped:
    """`model.mm_projector.{0,2}.*` → `mm.{0,2}.*`. KeyError when unknown."""
    table = {
        "0.weight": (llm_hidden, mm_hidden), "0.bias": (llm_hidden,),
        "2.weight": (llm_hidden, llm_hidden), "2.bias": (llm_hidden,),
    }
    rest = hf.removeprefix(PROJECTOR_PREFIX)
    if rest not in table:
        raise KeyError(hf)
    return Mapped(f"mm.{rest}", table[rest])


def clip_name(rel: str, vision: VisionSpec, keep_layers: int) -> Mapped | None:
    """Map a CLIP tensor (name relative to `vision_model.`); None for what libmtmd must not see."""
    h, ff, p = vision.hidden_size, vision.ffn_size, vision.patch_size
    fixed = {
        "embeddings.class_embedding": Mapped("v.class_embd", (h,)),
        "embeddings.patch_embedding.weight": Mapped("v.patch_embd.weight", (h, 3, p, p)),
        "embeddings.position_embedding.weight": Mapped("v.position_embd.weight", (vision.n_patches + 1, h)),
        "pre_layrnorm.weight": Mapped("v.pre_ln.weight", (h,)),
        "pre_layrnorm.bias": Mapped("v.pre_ln.bias", (h,)),
    }
    if rel in fixed:
        return fixed[rel]
    # LLaVA never uses the post-LayerNorm; written, libmtmd would apply it.
    if rel.startswith("post_layernorm.") or rel == "embeddings.position_ids":
        return None
    m = _CLIP_LAYER_RE.match(rel)
    if not m or m.group(2) not in _CLIP_LAYER:
        raise KeyError(rel)
    i, part, kind = int(m.group(1)), m.group(2), m.group(3)
    if i >= vision.n_layer:
        raise KeyError(rel)
    if i >= keep_layers:
        return None  # layers past the selected hidden state are never computed
    if part == "mlp.fc1":
        shape = (ff, h) if kind == "weight" else (ff,)
    elif part == "mlp.fc2":
        shape = (h, ff) if kind == "weight" else (h,)
    elif part.startswith("layer_norm"):
        shape = (h,)
    else:
        shape = (h, h) if kind == "weight" else (h,)
    return Mapped(f"v.blk.{i}.{_CLIP_LAYER[part]}.{kind}", shape)


def permute_for_rope(w, n_head: int):
    """HF's rotate-half Q/K rows → llama.cpp's interleaved rotary layout (llama arch only)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
