"""Sampling against Hugging Face's own logits processors (the release's `generate`): the greedy choice is
theirs exactly, and sampled tokens follow their distribution (chi-square over thousands of draws)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from huatuo_local.runtime.core.sampling import SamplingParams, kth_largest, next_token
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 2000
EOS = 7


def reference_probs(logits: np.ndarray, generated: list[int], p: SamplingParams) -> np.ndarray:
    """What transformers' generate samples from, in its order (penalty, temperature, top-k, top-p)."""
    scores = torch.tensor(logits, dtype=torch.float64)[None]
    ids = torch.tensor([generated], dtype=torch.long)
    processors = [RepetitionPenaltyLogitsProcessor(p.repetition_penalty), TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        processors.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        processors.append(TopPLogitsWarper(p.top_p))
    for proc in processors:
        scores = proc(ids, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability 0.001 (Wilson-Hilferty; z is that normal quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


CASES = [
    SamplingParams(),  # the release's defaults: temperature 0.2, penalty 1.2, top-k 50
    SamplingParams(temperature=1.0, repetition_penalty=1.0, top_k=50),
    SamplingParams(temperature=0.7, repetition_penalty=1.3, top_k=0, top_p=0.9),
    SamplingParams(temperature=1.3, repetition_penalty=1.1, top_k=20, top_p=0.8),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_sampled_tokens_follow_the_reference_distribution(params):
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal(VOCAB) * 2.5).astype(np.float32)
    generated = list(rng.integers(0, VOCAB, 40)) + [int(np.argmax(logits))] * 3  # repeats: the penalty bites
    want = reference_probs(logits, generated, params)
    draws = 4000
    draw_rng = np.random.default_rng(2026)
    counts = np.zeros(VOCAB)
    for _ in range(draws):
        counts[next_token(logits.copy(), generated, params, draw_rng, EOS)] += 1
    assert counts[want == 0].sum() == 0, "a token the reference never draws was drawn"
    expected = want * draws
    # Bins with fewer than 5 expected draws are pooled, as the test requires.
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((observed[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    assert df >= 1
    assert stat < chi2_critical(df), f"chi-square {stat:.1f} over {df} degrees of freedom"


def test_the_check_can_fail():
    """The same statistic rejects a sampler that ignores the temperature (the control)."""
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal(VOCAB) * 2.5).astype(np.float32)
    params = SamplingParams(temperature=0.7, repetition_penalty=1.0, top_k=50)
    want = reference_probs(logits, [1], params)
    wrong = SamplingParams(temperature=1.0, repetition_penalty=1.0, top_k=50)
    draw_rng = np.random.default_rng(5)
    counts = np.zeros(VOCAB)
    for _ in range(4000):
        counts[next_token(logits.copy(), [1], wrong, draw_rng, EOS)] += 1
    big = want * 4000 >= 5
    stat = float(((counts[big] - want[big] * 4000) ** 2 / (want[big] * 4000)).sum())
    assert stat > chi2_critical(int(big.sum()) - 1)


def test_greedy_is_the_references_argmax_and_eos_waits_for_the_first_token():
    rng = np.random.default_rng(3)
    for trial in range(200):
        logits = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
        generated = list(rng.integers(0, VOCAB, int(rng.integers(0, 30))))
        params = SamplingParams(temperature=0, repetition_penalty=float(rng.uniform(1.0, 1.5)))
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(
            torch.tensor([generated], dtype=torch.long), torch.tensor(logits, dtype=torch.float64)[None])
        if not generated:
            scores[0, EOS] = -math.inf  # min_new_tokens=1
        assert next_token(logits.copy(), generated, params, rng, EOS) == int(torch.argmax(scores)), trial
    peaked = np.zeros(VOCAB, dtype=np.float32)
    peaked[EOS] = 50.0
    assert next_token(peaked.copy(), [], SamplingParams(temperature=0), rng, EOS) != EOS
    assert next_token(peaked.copy(), [3], SamplingParams(temperature=0), rng, EOS) == EOS


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30])
def test_tiny_temperatures_are_greedy_not_nan(temperature):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(VOCAB) * 2).astype(np.float32)
    params = SamplingParams(temperature=temperature, repetition_penalty=1.0)
    assert next_token(logits.copy(), [1], params, rng, EOS) == int(np.argmax(logits))


def test_top_k_threshold_is_np_partitions_exactly():
    """The fast k-th largest (a strided bound, then an exact partition of what is not below it) equals
    np.partition on vocabulary-sized arrays, including sorted ones (the worst case for the stride),
    ties, -inf (eos masked, the penalty) and NaN (which np.partition ranks first)."""
    rng = np.random.default_rng(5)
    for trial in range(400):
        n = 152064 if trial % 2 else int(rng.integers(1, 200_000))
        k = min(n, int(rng.integers(1, 200)))
        x = (rng.standard_normal(n) * 3).astype(np.float32)
        kind = trial % 5
        if kind == 1:
            x = np.sort(x)
        elif kind == 2:
            x = np.round(x, 1)
        elif kind == 3:
            x[rng.integers(0, n, int(rng.integers(1, 2 * k + 2)))] = np.nan
        elif kind == 4:
            x[rng.integers(0, n, n // 2)] = -np.inf
        got, want = kth_largest(x, k), np.partition(x, -k)[-k]
        assert got == want or (np.isnan(got) and np.isnan(want)), (trial, n, k, kind, got, want)
