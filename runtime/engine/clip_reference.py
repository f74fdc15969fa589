"""The probe's model: a tiny seeded CLIP tower and `mlp` projector, computed in numpy.

What libmtmd must give for the probe image (`reference_embeddings`), and what the known upstream bug
(ggml-org/llama.cpp#25814: the class token appended after the patches) would give instead.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE, PATCH, V_HIDDEN, V_HEADS, V_FFN, V_LAYERS = 28, 14, 16, 2, 24, 2
LLM_HIDDEN = 16
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
EPS = 1e-5


def weights(seed: int = 1234) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_pos = (IMAGE_SIZE // PATCH) ** 2 + 1
    w: dict[str, np.ndarray] = {
        "v.class_embd": rng.standard_normal(V_HIDDEN),
        "v.patch_embd.weight": rng.standard_normal((V_HIDDEN, 3, PATCH, PATCH)) * 0.05,
        "v.position_embd.weight": rng.standard_normal((n_pos, V_HIDDEN)),
        "v.pre_ln.weight": 1 + 0.1 * rng.standard_normal(V_HIDDEN),
        "v.pre_ln.bias": 0.1 * rng.standard_normal(V_HIDDEN),
    }
    for i in range(V_LAYERS):
        p = f"v.blk.{i}."
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w[p + t + ".weight"] = rng.standard_normal((V_HIDDEN, V_HIDDEN)) / np.sqrt(V_HIDDEN)
            w[p + t + ".bias"] = 0.1 * rng.standard_normal(V_HIDDEN)
        for t in ("ln1", "ln2"):
            w[p + t + ".weight"] = 1 + 0.1 * rng.standard_normal(V_HIDDEN)
            w[p + t + ".bias"] = 0.1 * rng.standard_normal(V_HIDDEN)
        w[p + "ffn_up.weight"] = rng.standard_normal((V_FFN, V_HIDDEN)) / np.sqrt(V_HIDDEN)
        w[p + "ffn_up.bias"] = 0.1 * rng.standard_normal(V_FFN)
        w[p + "ffn_down.weight"] = rng.standard_normal((V_HIDDEN, V_FFN)) / np.sqrt(V_FFN)
        w[p + "ffn_down.bias"] = 0.1 * rng.standard_normal(V_HIDDEN)
    w["mm.0.weight"] = rng.standard_normal((LLM_HIDDEN, V_HIDDEN)) / np.sqrt(V_HIDDEN)
    w["mm.0.bias"] = 0.1 * rng.standard_normal(LLM_HIDDEN)
    w["mm.2.weight"] = rng.standard_normal((LLM_HIDDEN, LLM_HIDDEN)) / np.sqrt(LLM_HIDDEN)
    w["mm.2.bias"] = 0.1 * rng.standard_normal(LLM_HIDDEN)
    return {k: v.astype(np.float32) for k, v in w.items()}

def probe_image(seed: int = 99) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)

def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * w + b

def reference_embeddings(image: np.ndarray, w: dict[str, np.ndarray], class_token_last: bool = False) -> np.ndarray:
    """The tower + projector in float64 numpy; `class_token_last` reproduces the upstream bug."""
    x = (image.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)  # H, W, C
    g = IMAGE_SIZE // PATCH
    patches = x.reshape(g, PATCH, g, PATCH, 3).transpose(0, 2, 4, 1, 3).reshape(g * g, 3 * PATCH * PATCH)
    kernel = w["v.patch_embd.weight"].astype(np.float64).reshape(V_HIDDEN, -1)
    emb = patches @ kernel.T
    cls = w["v.class_embd"][None].astype(np.float64)
    h = np.concatenate([emb, cls] if class_token_last else [cls, emb])
    h = h + w["v.position_embd.weight"]
    h = _layer_norm(h, w["v.pre_ln.weight"], w["v.pre_ln.bias"])
    d = V_HIDDEN // V_HEADS
    for i in range(V_LAYERS):
        p = f"v.blk.{i}."
        a = _layer_norm(h, w[p + "ln1.weight"], w[p + "ln1.bias"])
        q, k, v = (a @ w[p + f"attn_{t}.weight"].T + w[p + f"attn_{t}.bias"] for t in "qkv")
        q, k, v = (t.reshape(-1, V_HEADS, d).transpose(1, 0, 2) for t in (q, k, v))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(-1, V_HIDDEN)
        h = h + o @ w[p + "attn_out.weight"].T + w[p + "attn_out.bias"]
        a = _layer_norm(h, w[p + "ln2.weight"], w[p + "ln2.bias"])
        f = a @ w[p + "ffn_up.weight"].T + w[p + "ffn_up.bias"]
        f = f / (1 + np.exp(-1.702 * f))  # quick_gelu
        h = h + f @ w[p + "ffn_down.weight"].T + w[p + "ffn_down.bias"]
    feats = h[1:]  # libmtmd always drops row 0, the class token's place
    y = feats @ w["mm.0.weight"].T + w["mm.0.bias"]
    y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))  # ggml_gelu
    return y @ w["mm.2.weight"].T + w["mm.2.bias"]
