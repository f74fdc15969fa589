"""The probe's GGUF pair: the tiny tower as an mmproj, beside the 1-layer LLM libmtmd needs to load it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from huatuo_local.models.bytelevel import bytes_to_unicode
from huatuo_local.runtime.engine.clip_reference import (
    EPS,
    IMAGE_SIZE,
    LLM_HIDDEN,
    MEAN,
    PATCH,
    STD,
    V_FFN,
    V_HEADS,
    V_HIDDEN,
    V_LAYERS,
    weights,
)


# Long: one file written key by key, in the file's own order; split up, the layout would be harder to read.
def write_probe_pair(folder: Path) -> tuple[Path, Path]:
    """A 1-layer LLM with a byte vocabulary and the probe's mmproj, both F32."""
    from gguf import GGUFWriter
    from huatuo_local.models.gguf_keys import write_vision_header

    w = weights()
    mm = folder / "probe-mmproj.gguf"
    writer = GGUFWriter(mm, "clip")
    write_vision_header(writer, image_size=IMAGE_SIZE, patch_size=PATCH, width=V_HIDDEN, ffn=V_FFN,
                        projection_dim=LLM_HIDDEN, heads=V_HEADS, norm_eps=EPS, blocks=V_LAYERS, mean=MEAN,
                        std=STD, gelu=False)  # CLIP's quick GELU, as the release's tower
    for name, arr in w.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    rng = np.random.default_rng(7)
    llm = folder / "probe-llm.gguf"
    writer = GGUFWriter(llm, "qwen2")
    n_vocab, ffn = 259, 32
    writer.add_context_length(64)
    writer.add_embedding_length(LLM_HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    byte_chars = bytes_to_unicode()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([byte_chars[b] for b in range(256)] + ["ab", "<|endoftext|>", "<|pad|>"])
    writer.add_token_types([1] * 257 + [3, 3])
    writer.add_token_merges(["a b"])  # llama.cpp refuses a BPE vocabulary without merges
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(257)
    writer.add_add_bos_token(False)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    writer.add_tensor("token_embd.weight", t(n_vocab, LLM_HIDDEN))
    writer.add_tensor("output_norm.weight", np.ones(LLM_HIDDEN, np.float32))
    writer.add_tensor("output.weight", t(n_vocab, LLM_HIDDEN))
    for name, shape in (("attn_norm.weight", (LLM_HIDDEN,)), ("ffn_norm.weight", (LLM_HIDDEN,)),
                        ("attn_q.weight", (LLM_HIDDEN, LLM_HIDDEN)), ("attn_q.bias", (LLM_HIDDEN,)),
                        ("attn_k.weight", (LLM_HIDDEN, LLM_HIDDEN)), ("attn_k.bias", (LLM_HIDDEN,)),
                        ("attn_v.weight", (LLM_HIDDEN, LLM_HIDDEN)), ("attn_v.bias", (LLM_HIDDEN,)),
                        ("attn_output.weight", (LLM_HIDDEN, LLM_HIDDEN)), ("ffn_gate.weight", (ffn, LLM_HIDDEN)),
                        ("ffn_up.weight", (ffn, LLM_HIDDEN)), ("ffn_down.weight", (LLM_HIDDEN, ffn))):
        writer.add_tensor(f"blk.0.{name}", np.ones(shape, np.float32) if "norm" in name else t(*shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return llm, mm
