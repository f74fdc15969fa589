"""Choosing the next token the way the release's `generate` does (Hugging Face semantics).

Order: repetition penalty (over generated tokens only, since the release passes
`inputs_embeds`), then temperature, top-k, top-p; greedy when temperature is 0; the
checkpoint's eos is masked until `min_new_tokens` tokens exist. Only when asked for (the API's
fields; off by default, as in the release): a schema's mask first (runtime/core/structured.py,
applied by the scheduler), then `logit_bias`, and OpenAI's presence and frequency penalties after
the repetition penalty.

Speed: this runs once per answer per step, so it works on llama.cpp's float32 logits in
place (no copy of the vocabulary) and touches the whole vocabulary only with one partition
and one comparison; softmax, top-p and the draw run in float64 on the top-k candidates
alone. The candidates are kept in token order, so the draw walks the same cumulative
distribution as a draw over the whole vocabulary would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from huatuo_local.models import defaults
from huatuo_local.models.errors import HuatuoError

if TYPE_CHECKING:
    from huatuo_local.runtime.core.structured import Grammar


class NonFiniteScores(HuatuoError):
    """The model gave NaN scores: no token can be chosen (a damaged model file, or a config llama.cpp
    computes NaN from)."""

    def __init__(self) -> None:
        super().__init__("the model produced NaN scores, so no answer can be made; the model file may be damaged "
                         "(convert it again; `huatuo-local verify --reference` compares it with a lossless one)")


class SettingError(HuatuoError):
    """A sampling setting out of its range; `setting` names it (a front-end names its own flag or field)."""

    def __init__(self, setting: str, detail: str):
        super().__init__(f"{setting} {detail}")
        self.setting, self.detail = setting, detail


# Each setting's accepted range, the same for the CLI, the Python API and the server:
# (low, high, low is allowed). Temperature 0 is greedy; top-p 0 would keep nothing.
RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, 1 << 20, True),
    "repetition_penalty": (0.01, 10.0, True),
    "max_new_tokens": (1, 1 << 20, True),
    "min_new_tokens": (0, 1 << 20, True),
    "presence_penalty": (-2.0, 2.0, True),
    "frequency_penalty": (-2.0, 2.0, True),
}
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows


MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class SamplingParams:
    temperature: float = defaults.TEMPERATURE
    repetition_penalty: float = defaults.REPETITION_PENALTY
    top_k: int = defaults.TOP_K
    top_p: float = defaults.TOP_P
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    min_new_tokens: int = defaults.MIN_NEW_TOKENS
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (runtime/core/stops.py)
    # The answer must be a document of this grammar (runtime/core/structured.py); None: free text.
    grammar: Grammar | None = None
    # Each answer token's log-probability and this many alternatives (0-20); None: not computed.
    logprobs: int | None = None
    # The first answer token's raw scores of these tokens (eval: the option letters), in Result.first_scores.
    score_tokens: tuple[int, ...] = ()
    # OpenAI's additive penalties (0: off, the release's) and per-token biases (token id -> -100..100).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def check(self) -> SamplingParams:
        """Raise SettingError for the first setting outside RANGES (NaN included); return self."""
        from huatuo_local.runtime.core.stops import MAX_STOP_CHARS, MAX_STOPS

        for name, (lo, hi, low_ok) in RANGES.items():
            value = getattr(self, name)
            if not (lo <= value <= hi) or (value == lo and not low_ok):
                low = f"from {lo:g}" if low_ok else f"above {lo:g}"
                raise SettingError(name, f"must be {low} to {hi:g} (got {value})")
        if len(self.stop) > MAX_STOPS or any(not isinstance(x, str) or len(x) > MAX_STOP_CHARS for x in self.stop):
            raise SettingError("stop", f"takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or any(not -100 <= b <= 100 or t < 0 for t, b in self.logit_bias):
            raise SettingError("logit_bias", f"takes at most {MAX_LOGIT_BIAS} token ids, each with a bias from -100 "
                                             "to 100")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise SettingError("top_logprobs", f"must be from 0 to {MAX_TOP_LOGPROBS} (got {self.logprobs})")
        return self


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token's log-probability under the model's own distribution (before the repetition penalty,
    temperature, top-k/top-p and any schema's mask, as vLLM reports by default), and the most likely
    alternatives at that position: (text, bytes, log-probability) each."""

    token: int
    text: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[tuple[str, tuple[int, ...], float], ...] = ()


def log_softmax_at(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log p(token) for `tokens` under softmax(logits), in float64, without a copy of the vocabulary's
    probabilities (one exp over it)."""
    finite = logits[np.isfinite(logits)]
    top = float(finite.max()) if finite.size else 0.0
    with np.errstate(under="ignore", over="ignore"):
        norm = top + float(np.log(np.exp((logits - top).astype(np.float64)).sum()))
    return logits[tokens].astype(np.float64) - norm


def top_tokens(logits: np.ndarray, n: int) -> np.ndarray:
    """The n highest-scoring tokens, best first (ties: the lower id first)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    best = np.argpartition(-logits, n - 1)[:n] if n < logits.size else np.arange(logits.size)
    return best[np.lexsort((best, -logits[best]))]


def apply_repetition_penalty(logits: np.ndarray, generated: list[int], penalty: float) -> np.ndarray:
    """HF's RepetitionPenaltyLogitsProcessor, in place on the generated tokens' entries."""
    if penalty == 1.0 or not generated:
        return logits
    # Repeated ids need no np.unique: every copy reads the same value before any write and writes
    # the same result (HF's gather/scatter does the same).
    ids = np.asarray(generated, dtype=np.int64)
    vals = logits[ids]
    logits[ids] = np.where(vals < 0, vals * penalty, vals / penalty)
    return logits


def kth_largest(x: np.ndarray, k: int) -> float:
    """The k-th largest value of `x`, exactly as `np.partition(x, -k)[-k]` gives it (NaN ranks above
    everything, as there), in about a third of the time for a vocabulary-sized `x` and a small k.

    Every 16th entry's k-th largest value is a lower bound of the whole array's (those k entries are
    in it), so the top k are among the entries not below it: usually a few hundred, and the exact
    partition runs on those alone."""
    if x.size < 64 * k:
        return np.partition(x, -k)[-k]
    bound = np.partition(x[::16], -k)[-k]
    # `not below` rather than `>=`: NaN entries stay in, as they rank first in np.partition.
    return np.partition(x[~(x < bound)], -k)[-k]


def next_token(logits: np.ndarray, generated: list[int], params: SamplingParams, rng: np.random.Generator,
               eos_id: int) -> int:
    """The next token. `logits` (the vocabulary's scores) is modified in place: pass a copy to keep it."""
    if params.logit_bias:
        ids = np.fromiter((t for t, _ in params.logit_bias), dtype=np.int64)
        keep = ids < logits.size  # the server refuses others; a direct caller's are ignored
        logits[ids[keep]] += np.fromiter((b for _, b in params.logit_bias), dtype=np.float32)[keep]
    if len(generated) < params.min_new_tokens:
        logits[eos_id] = -np.inf
    apply_repetition_penalty(logits, generated, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated:
        ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        logits[ids] -= np.float32(params.presence_penalty) + np.float32(params.frequency_penalty) * counts
    if params.temperature <= 0:
        best = int(np.argmax(logits))  # numpy's argmax is the first NaN when there is one: one check suffices
        if np.isnan(logits[best]):
            raise NonFiniteScores()
        return best
    if 0 < params.top_k < logits.size:
        # HF keeps every token scoring at least the k-th best (ties included).
        kth = kth_largest(logits, params.top_k)
        if np.isnan(kth):  # at least k NaN scores (NaN ranks first): nothing real to draw from
            raise NonFiniteScores()
        candidates = np.flatnonzero(logits >= kth)
    else:
        candidates = np.arange(logits.size)
    scores = logits[candidates].astype(np.float64)
    top = scores.max()  # NaN when any candidate is
    if np.isnan(top):
        raise NonFiniteScores()
    if not np.isfinite(top):  # nothing is left to draw from but the best
        return int(candidates[int(np.argmax(scores))])
    # Scaled after subtracting the maximum: any positive temperature, however small, stays finite
    # (dividing first overflows to inf and the softmax to NaN).
    with np.errstate(over="ignore", under="ignore"):  # a tiny temperature overflows to -inf: exp gives 0
        probs = np.exp((scores - top) / params.temperature)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # HF keeps the smallest set whose mass reaches top_p (always at least one token).
        drop = cum - probs[order] >= params.top_p
        probs[order[drop]] = 0.0
        probs /= probs.sum()
    return int(candidates[rng.choice(probs.size, p=probs)])
