"""Choosing the next token the way the release's `generate` does (Hugging Face semantics).

Order: repetition penalty (over generated tokens only, since the release passes
`inputs_embeds`), then temperature, top-k, top-p; greedy when temperature is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from huatuo_local.models import defaults


@dataclass
class SamplingParams:
    temperature: float = defaults.TEMPERATURE
    repetition_penalty: float = defaults.REPETITION_PENALTY
    top_k: int = defaults.TOP_K
    top_p: float = defaults.TOP_P
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    min_new_tokens: int = defaults.MIN_NEW_TOKENS
    seed: int | None = None


def apply_repetition_penalty(logits: np.ndarray, generated: list[int], penalty: float) -> np.ndarray:
    if penalty == 1.0 or not generated:
        return logits
    ids = np.unique(np.asarray(generated, dtype=np.int64))
    vals = logits[ids]
    logits[ids] = np.where(vals < 0, vals * penalty, vals / penalty)
    return logits


def next_token(logits: np.ndarray, generated: list[int], params: SamplingParams, rng: np.random.Generator,
               eos_id: int) -> int:
    logits = logits.astype(np.float64, copy=True)
    if len(generated) < params.min_new_tokens:
        logits[eos_id] = -np.inf
    logits = apply_repetition_penalty(logits, generated, params.repetition_penalty)
    if params.temperature <= 0:
        return int(np.argmax(logits))
    logits /= params.temperature
    if 0 < params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # HF keeps the smallest set whose mass reaches top_p (always at least one token).
        drop = cum - probs[order] >= params.top_p
        probs[order[drop]] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
