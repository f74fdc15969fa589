"""GGUF files with a known model's real shapes whose data was never written (sparse: a few MB on disk).

llama.cpp sizes a quant from the shapes alone (its quantizer's dry run) and plans a context's memory
without the weights (its no-alloc load), so these files give llama.cpp's own figures for the 7B and
34B in seconds, on any machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from huatuo_local.models.registry import LlmShape


def write_sparse_llm(path: Path, shape: LlmShape) -> Path:
    """An F16 GGUF of `shape` at full depth, with a placeholder vocabulary; its tensor data is a hole."""
    w = GGUFWriter(str(path), shape.arch)
    w.add_context_length(32768)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_file_type(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(shape.n_vocab)])
    w.add_token_types([1] * shape.n_vocab)
    w.add_token_merges(["t 0"])
    w.add_eos_token_id(0)
    kv = shape.n_embd // shape.n_head * shape.n_head_kv
    total = 0

    def tensor(name: str, dims: tuple[int, ...], f32: bool = False) -> None:
        nonlocal total
        nbytes = int(np.prod(dims)) * (4 if f32 else 2)
        w.add_tensor_info(name, dims, np.dtype(np.float32 if f32 else np.float16), nbytes,
                          raw_dtype=QT.F32 if f32 else QT.F16)
        total += -(-nbytes // 32) * 32

    tensor("token_embd.weight", (shape.n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        tensor(p + "attn_norm.weight", (shape.n_embd,), True)
        tensor(p + "ffn_norm.weight", (shape.n_embd,), True)
        for name, rows in (("attn_q", shape.n_embd), ("attn_k", kv), ("attn_v", kv)):
            tensor(p + name + ".weight", (rows, shape.n_embd))
            if shape.qkv_bias:
                tensor(p + name + ".bias", (rows,), True)
        tensor(p + "attn_output.weight", (shape.n_embd, shape.n_embd))
        tensor(p + "ffn_gate.weight", (shape.n_ff, shape.n_embd))
        tensor(p + "ffn_up.weight", (shape.n_ff, shape.n_embd))
        tensor(p + "ffn_down.weight", (shape.n_embd, shape.n_ff))
    tensor("output_norm.weight", (shape.n_embd,), True)
    tensor("output.weight", (shape.n_vocab, shape.n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    start = -(-path.stat().st_size // 32) * 32
    with open(path, "r+b") as f:
        f.truncate(start + total)  # the data: a hole, read by nobody
    return path


def planned_compute_bytes(path: Path, n_ctx: int, n_ubatch: int) -> int:
    """The compute and output buffers llama.cpp plans for a context on `path` (its no-alloc load: nothing is
    read or allocated), as its log reports them."""
    found = logged_buffer_mib(path, rb"(?:compute|output) buffer size\s*=\s*([0-9.]+) MiB", n_ctx, n_ubatch)
    return int(sum(found) * 1024 * 1024)


def logged_buffer_mib(path: Path, pattern: bytes, n_ctx: int, n_ubatch: int = 512,
                      plan_only: bool = True, flash_attn: bool = False) -> list[float]:
    """Load `path` on the CPU, make a context of `n_ctx`, and return the sizes (MiB) llama.cpp's log reports
    in the lines `pattern` matches (its group 1). `plan_only`: llama.cpp's no-alloc load, nothing read.
    `flash_attn`: as on a GPU, where llama.cpp's default turns it on (no n_ctx x n_ubatch score matrix)."""
    import ctypes
    import re

    import llama_cpp
    from huatuo_local.convert.quantize import llama_logs_to
    from huatuo_local.runtime.rpc.client import device_list

    found: list[float] = []
    compiled = re.compile(pattern)

    def on_line(_level: int, text: bytes) -> None:
        m = compiled.search(text)
        if m:
            found.append(float(m.group(1)))

    devices = device_list()  # not llama.cpp's default: RPC workers an earlier test registered may be gone
    with llama_logs_to(on_line):
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        if plan_only:
            mp.no_alloc, mp.load_mode = True, 0  # no mmap: nothing to map in a plan
        if devices is not None:
            mp.devices = ctypes.cast(devices, ctypes.c_void_p)
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        assert model, f"{path}: llama.cpp did not load it"
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.flash_attn_type = n_ctx, 2048, n_ubatch, 1 if flash_attn else 0
        ctx = llama_cpp.llama_init_from_model(model, cp)
        assert ctx, f"{path}: llama.cpp did not make a context"
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return found
