"""The models huatuo-local knows by name."""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024**3


@dataclass(frozen=True)
class KnownModel:
    name: str
    repo_id: str
    backbone: str
    arch: str
    default_quant: str
    # Approximate GGUF sizes in GiB of the LLM for each quant (parameters × bits per weight),
    # plus the F16 mmproj; the runtime adds the KV cache and compute buffers.
    llm_gib: dict[str, float] = field(default_factory=dict)
    mmproj_gib: float = 0.6
    kv_gib_per_4k: float = 0.25

    def ram_needed_gib(self, quant: str, n_ctx: int = 8192) -> float:
        return self.llm_gib[quant] + self.mmproj_gib + self.kv_gib_per_4k * n_ctx / 4096 + 0.5


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            "huatuo-vision-7b", "FreedomIntelligence/HuatuoGPT-Vision-7B", "Qwen2-7B", "qwen2", "Q4_K_M",
            {"Q4_K_M": 4.4, "Q5_K_M": 5.1, "Q6_K": 5.8, "Q8_0": 7.5, "F16": 14.2},
            kv_gib_per_4k=0.22,
        ),
        KnownModel(
            "huatuo-vision-34b", "FreedomIntelligence/HuatuoGPT-Vision-34B", "Yi-1.5-34B", "llama", "Q4_K_M",
            {"Q4_K_M": 19.3, "Q5_K_M": 22.7, "Q6_K": 26.3, "Q8_0": 34.0, "F16": 64.1},
            mmproj_gib=0.6, kv_gib_per_4k=0.94,
        ),
    )
}
DEFAULT_MODEL = "huatuo-vision-7b"
