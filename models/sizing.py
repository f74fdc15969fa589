"""How much memory a known model needs at each quant, and the best quant that fits a machine.

What a run holds: the LLM file, the vision projector, the KV cache for the context (f16: 2 bytes a
value; K and V of every layer for every position), llama.cpp's compute buffers (the LLM's and the
vision encoder's), and headroom for the runtime itself and the allocators' slack (0.5 GiB and 5 %).
The sizes are llama.cpp's own for the real shapes (models/registry.py); the quality figure is each
quant's measured cost against F16 at the model's real widths (FIDELITY.md, bench/quants.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import gguf_keys as keys
from .registry import GIB, KnownModel

DEFAULT_CTX = 8192  # positions per conversation unless --ctx says otherwise
# Best first. F16/BF16 are left out: no measurable gain over Q8_0 for twice the memory and half the speed.
QUALITY_ORDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_XS")
# The vision encoder's working memory: libmtmd reserves 19 MiB for CLIP ViT-L/14-336 at load; this
# allowance also covers the decoded image and its 576 embeddings on their way to the LLM.
VISION_COMPUTE_BYTES = 200 * 1024**2
HEADROOM_BYTES = GIB // 2
HEADROOM_FRACTION = 0.05
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "f32": 4.0}  # per cached value

# Each quant's measured cost against F16: the mean KL divergence of the next-token distributions on six
# held-out image prompts, as `pull` makes the quant (Q4_K_M without a matrix, lower ones with the
# image+text matrix). Random weights at each model's real widths, 2 of the 7B's layers and 1 of the
# 34B's (bench/quants.py, 2026-11-30; FIDELITY.md says what that can and cannot show); the two models'
# figures are not comparable with each other; not measured for Q5_K_M and above.
MEASURED_KL: dict[str, dict[str, float]] = {
    "huatuo-vision-7b": {"Q4_K_M": 0.0370, "IQ4_XS": 0.0305, "Q3_K_M": 0.0640, "IQ3_M": 0.0711,
                         "IQ3_XXS": 0.1195, "IQ2_M": 0.1898, "IQ2_XS": 0.3196},
    "huatuo-vision-34b": {"Q4_K_M": 0.0704, "IQ4_XS": 0.0853, "Q3_K_M": 0.2397, "IQ3_M": 0.2497,
                          "IQ3_XXS": 0.4533, "IQ2_M": 0.5336, "IQ2_XS": 0.9003},
}


@dataclass(frozen=True)
class Need:
    weights: int
    kv: int
    compute: int
    headroom: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.headroom


def memory_needed(model: KnownModel, quant: str, n_ctx: int = DEFAULT_CTX, gpu: bool = False,
                  kv_type: str = "f16") -> Need:
    """What running `model` at `quant` holds in memory (RAM, or with `gpu` the GPU's)."""
    weights = model.llm_bytes[quant] + model.mmproj_bytes
    kv = model.shape.kv_bytes_per_token(KV_BYTES[kv_type]) * n_ctx
    compute = (model.compute_bytes_gpu if gpu else model.compute_bytes_cpu) + VISION_COMPUTE_BYTES
    headroom = HEADROOM_BYTES + int(HEADROOM_FRACTION * (weights + kv + compute))
    return Need(weights, kv, compute, headroom)


@dataclass
class QuantChoice:
    model: KnownModel
    budget: int  # bytes free where it runs
    where: str  # "RAM" or "GPU"
    quant: str | None  # the best that fits; None: nothing does
    fits: list[str] = field(default_factory=list)  # every quant that fits, best first
    # A better quant that fits with a smaller context and an 8-bit KV cache: (quant, n_ctx)
    stretch: tuple[str, int] | None = None

    def need(self, quant: str | None = None) -> Need:
        return memory_needed(self.model, quant or self.quant or QUALITY_ORDER[-1], gpu=self.where == "GPU")

    def describe(self, quant: str | None = None) -> str:
        """`IQ3_XXS: needs 17.4 GiB of 18.0 GiB free RAM; KL to F16 0.120 (FIDELITY.md)` for the choice
        (or `quant`)."""
        q = quant or self.quant
        if q is None:
            smallest = QUALITY_ORDER[-1]
            return (f"nothing fits in {self.budget / GIB:.1f} GiB free {self.where} (the smallest, {smallest}, "
                    f"needs {self.need(smallest).total / GIB:.1f} GiB)")
        text = f"{q}: needs {self.need(q).total / GIB:.1f} GiB of {self.budget / GIB:.1f} GiB free {self.where}"
        kl = MEASURED_KL.get(self.model.name, {}).get(q)
        if kl is not None:
            text += f"; KL to F16 {kl:.3f} (FIDELITY.md)"
        return text


def best_quant(model: KnownModel, budget: int, gpu: bool = False) -> QuantChoice:
    """The best quant of `model` whose weights, KV cache (default context) and buffers fit `budget` bytes."""
    fits = [q for q in QUALITY_ORDER if memory_needed(model, q, gpu=gpu).total <= budget]
    choice = QuantChoice(model, budget, "GPU" if gpu else "RAM", fits[0] if fits else None, fits)
    better = QUALITY_ORDER[:QUALITY_ORDER.index(choice.quant)] if choice.quant else QUALITY_ORDER
    for n_ctx in (4096, 2048):
        smaller = [q for q in better if memory_needed(model, q, n_ctx, gpu, "q8_0").total <= budget]
        if smaller:
            choice.stretch = (smaller[0], n_ctx)
            break
    return choice


@dataclass(frozen=True)
class FreeMemory:
    """What this machine has free for a model: RAM, and the GPUs' memory (None: no GPU)."""

    ram: int
    gpu: int | None = None


def machine_choice(model: KnownModel, free: FreeMemory) -> QuantChoice:
    """`model`'s best quant for this free memory: in the GPUs' when one fits there, else in RAM (pull, doctor)."""
    choice = best_quant(model, int(free.ram))
    if free.gpu:
        on_gpu = best_quant(model, int(free.gpu), gpu=True)
        if on_gpu.quant is not None:
            choice = on_gpu
    return choice


def files_need(llm_path: Path, mmproj_path: Path, gpu: bool = False, n_ctx: int = DEFAULT_CTX) -> Need:
    """What a converted pair of an unknown model holds: its files, its KV cache from the GGUF header, and the
    known models' allowances for compute buffers (the 7B's: a larger model's are larger, which the headroom
    covers only roughly)."""
    from .gguf_check import check_gguf
    from .registry import KNOWN_MODELS

    info = check_gguf(llm_path, "llm")
    f = info.fields

    def number(template: str) -> int:
        value = f.get(keys.llm_key(template, info.arch))
        return value if isinstance(value, int) and value > 0 else 0

    n_layer, n_embd = number(keys.BLOCK_COUNT), number(keys.EMBEDDING_LENGTH)
    n_head = number(keys.HEAD_COUNT)
    n_head_kv = number(keys.HEAD_COUNT_KV) or n_head
    kv = int(2 * n_layer * n_head_kv * (n_embd // max(n_head, 1)) * KV_BYTES["f16"]) * n_ctx
    weights = llm_path.stat().st_size + mmproj_path.stat().st_size
    seven = next(iter(KNOWN_MODELS.values()))
    compute = (seven.compute_bytes_gpu if gpu else seven.compute_bytes_cpu) + VISION_COMPUTE_BYTES
    return Need(weights, kv, compute, HEADROOM_BYTES + int(HEADROOM_FRACTION * (weights + kv + compute)))


def installed_choice(quants: list[str], need: Callable[[str, bool], int], free: FreeMemory | None) -> str:
    """Which of the installed `quants` a bare model name means: the best (QUALITY_ORDER, lossless types
    after it) that fits the GPUs' free memory, else the best that fits RAM, else the smallest — the rule
    `doctor` and `pull` use to recommend a quant, applied to what is installed. Without `free`, the best."""
    order = sorted(quants, key=lambda q: (QUALITY_ORDER.index(q) if q in QUALITY_ORDER else len(QUALITY_ORDER), q))
    if free is None:
        return order[0]
    for budget, gpu in ((free.gpu, True), (free.ram, False)):
        if budget:
            fitting = [q for q in order if need(q, gpu) <= budget]
            if fitting:
                return fitting[0]
    return min(order, key=lambda q: need(q, False))
