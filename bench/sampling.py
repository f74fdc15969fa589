"""Sampling's cost per token on a vocabulary-sized logits vector (Qwen2's 152064), in isolation.

The release's defaults (temperature 0.2, top-k 50, penalty 1.2 over 300 generated tokens) and
greedy, beside the one-call top-k threshold (np.partition) that `kth_largest` replaces.

    .venv/bin/python bench/sampling.py
"""

from __future__ import annotations

import timeit

import numpy as np
from huatuo_local.runtime.core.sampling import SamplingParams, kth_largest, next_token


def per_call_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(152064) * 3).astype(np.float32)
    generated = [int(t) for t in rng.integers(0, logits.size, 300)]
    work = logits.copy()

    def fresh(params: SamplingParams):
        def call() -> int:
            work[:] = logits  # each call starts from the same scores (the penalty writes in place)
            return next_token(work, generated, params, rng, 5)
        return call

    copy_only = per_call_us(lambda: work.__setitem__(slice(None), logits), 2000)
    rows = [
        ("next_token, the release's defaults", per_call_us(fresh(SamplingParams()), 1000) - copy_only),
        ("next_token, greedy", per_call_us(fresh(SamplingParams(temperature=0)), 2000) - copy_only),
        ("top-50 threshold: kth_largest", per_call_us(lambda: kth_largest(logits, 50), 2000)),
        ("top-50 threshold: np.partition", per_call_us(lambda: np.partition(logits, -50)[-50], 2000)),
    ]
    print("| what | µs per token |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.0f} |")


if __name__ == "__main__":
    main()
