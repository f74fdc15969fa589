"""The models huatuo-local knows by name: where they come from, their shapes, and llama.cpp's sizes for them."""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024**3


@dataclass(frozen=True)
class LlmShape:
    """The language model's dimensions (from the release's config.json)."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    qkv_bias: bool

    def kv_bytes_per_token(self, bytes_per_value: float = 2.0) -> int:
        """K and V of every layer for one position (f16 cache: 2 bytes a value)."""
        return int(2 * self.n_layer * self.n_head_kv * (self.n_embd // self.n_head) * bytes_per_value)


@dataclass(frozen=True)
class KnownModel:
    name: str
    repo_id: str
    backbone: str
    arch: str
    default_quant: str
    shape: LlmShape
    # llama.cpp's own figures for this shape (tests/test_sizing.py checks them; bench/quants.py sizes
    # prints them): the LLM file of each quant (its quantizer's dry run), the F16 vision projector, and
    # the compute buffers llama.cpp plans for a context at the default 8192 positions on its CPU backend
    # with flash attention off, in batches of 256 (a CPU run: what it allocates) and of 512 (what a GPU
    # run batches: planned on the CPU backend, so an allowance for the GPU's buffers, not a measurement of
    # them; with flash attention on, as on a GPU, the attention's buffer is smaller, so it errs large).
    llm_bytes: dict[str, int] = field(default_factory=dict)
    mmproj_bytes: int = 0
    compute_bytes_cpu: int = 0
    compute_bytes_gpu: int = 0


QWEN2_7B = LlmShape("qwen2", 28, 3584, 18944, 28, 4, 152064, True)
YI_34B = LlmShape("llama", 60, 7168, 20480, 56, 8, 64000, False)

KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            "huatuo-vision-7b", "FreedomIntelligence/HuatuoGPT-Vision-7B", "Qwen2-7B", "qwen2", "Q4_K_M", QWEN2_7B,
            {"F16": 15231898091, "Q8_0": 8092574023, "Q6_K": 6248244183, "Q5_K_M": 5438879825, "Q4_K_M": 4677120819,
             "IQ4_XS": 4244342046, "Q3_K_M": 3802440663, "IQ3_M": 3568062955, "IQ3_XXS": 3224727715,
             "IQ2_M": 2774385295, "IQ2_XS": 2463063080},
            mmproj_bytes=616_698_976, compute_bytes_cpu=263276462, compute_bytes_gpu=525955235,
        ),
        KnownModel(
            "huatuo-vision-34b", "FreedomIntelligence/HuatuoGPT-Vision-34B", "Yi-1.5-34B", "llama", "Q4_K_M", YI_34B,
            {"F16": 68779570626, "Q8_0": 36540776448, "Q6_K": 28212419624, "Q5_K_M": 24320336199,
             "Q4_K_M": 20657198858, "IQ4_XS": 18634107781, "Q3_K_M": 16653410631, "IQ3_M": 15563185192,
             "IQ3_XXS": 13881720176, "IQ2_M": 11793250385, "IQ2_XS": 10305027440},
            mmproj_bytes=701_138_016, compute_bytes_cpu=517199626, compute_bytes_gpu=1034158080,
        ),
    )
}
DEFAULT_MODEL = "huatuo-vision-7b"
