"""`huatuo-local verify`: a converted model measured against the original PyTorch model (reference.py).

For each GGUF: the image embeddings' cosine and largest difference, and with the release's own tokens
fed back (teacher forcing), the per-position KL divergence and top-1 agreement of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huatuo_local.models.prompt import IMAGE_TOKEN, Turn, render_prompt
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.verify.reference import OriginalModel


@dataclass
class VerifyRow:
    model: str
    embedding_cosine_min: float
    embedding_max_abs: float
    kl_mean: float
    kl_max: float
    top1_agreement: float
    positions: int


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) of two next-token distributions given as log-probabilities."""
    return float((np.exp(p) * (p - q)).sum())


def embedding_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two encodings of one image (positions x width): the smallest per-position cosine, the largest
    absolute difference."""
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cosine.min()), float(np.abs(a - b).max())


def measuring(config: ModelConfig | None, model: str | Path) -> ModelConfig:
    """How verify loads each model: the user's load options, with an f32 KV cache (the measurement's own
    rounding out of the figures), 4096 positions, one sequence and no prefix cache."""
    return (config or ModelConfig()).with_(model=str(model), ctx=4096, kv_type="f32", parallel=1, prefix_cache=False)


def verify(original: str | Path, models: list[str | Path], images: list[str | Path], prompt: str,
           n_tokens: int = 32, vision_tower: str | None = None, config: ModelConfig | None = None) -> list[VerifyRow]:
    """Image-embedding cosine, per-token KL and top-1 agreement of each GGUF model vs the original."""
    from huatuo_local.runtime.core.loading import open_model
    from huatuo_local.runtime.core.session import Session
    from huatuo_local.runtime.images.loader import load_rgb, prepare

    ref = OriginalModel(original, vision_tower)
    full = render_prompt([Turn(prompt, len(images))], IMAGE_TOKEN)
    want_tokens, want_logits = ref.generate(full, list(images), n_tokens)
    ref_feats = [ref.image_features(p).numpy() for p in images]
    rows = []
    for model in models:
        loaded = open_model(measuring(config, model))
        m = loaded.model
        with loaded.engine as engine:
            cos, mx = [], 0.0
            for path, theirs in zip(images, ref_feats):
                ours = engine.image_embeddings(prepare(load_rgb(path), engine.vision)).astype(np.float64)
                c, d = embedding_difference(ours, theirs)
                cos.append(c)
                mx = max(mx, d)
            session = Session(engine)
            items = session.items_for([Turn(prompt, len(images))], session.prepare_images(list(images)))
            kls, agree = [], 0
            for step, want in enumerate(want_logits):
                # Teacher forcing: the release's own tokens so far; only the newest is evaluated.
                got = session.evaluate(items + list(want_tokens[:step])).astype(np.float64)
                kls.append(kl_divergence(log_softmax(want), log_softmax(got)))
                agree += int(np.argmax(got) == np.argmax(want))
            session.close()
        rows.append(VerifyRow(m.ref, float(min(cos)) if cos else float("nan"), mx,
                              float(np.mean(kls)), float(np.max(kls)), agree / len(want_logits), len(want_logits)))
    return rows


def format_table(rows: list[VerifyRow]) -> str:
    lines = ["| model | image-embedding cosine (min) | embedding max abs diff | KL mean | KL max | "
             "top-1 agreement | positions |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.embedding_cosine_min:.6f} | {r.embedding_max_abs:.2e} | {r.kl_mean:.2e} | "
                     f"{r.kl_max:.2e} | {r.top1_agreement * 100:.1f}% | {r.positions} |")
    return "\n".join(lines)
