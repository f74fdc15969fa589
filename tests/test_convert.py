"""The converter: every tensor, every key, every layout, read back with gguf's own reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, TokenType
from gguf.quants import dequantize
from tiny_models import TinySpec, clip_stored

# Independent of convert/names.py on purpose: the expected GGUF name of every HF tensor.
LLM_EXPECTED = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_EXPECTED = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
CLIP_LAYER_EXPECTED = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.LlamaModel.permute, written out again here.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_llm(info: dict) -> dict[str, np.ndarray]:
    s: TinySpec = info["spec"]
    out = {}
    for name, arr in info["stored"].items():
        if name in LLM_EXPECTED:
            out[LLM_EXPECTED[name]] = arr
        elif name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            arr2 = arr
            if s.arch == "llama" and rest.startswith("self_attn.q_proj"):
                arr2 = rope_permute(arr, s.heads)
            if s.arch == "llama" and rest.startswith("self_attn.k_proj"):
                arr2 = rope_permute(arr, s.kv_heads)
            out[f"blk.{i}.{LAYER_EXPECTED[rest]}"] = arr2
    return out


def expected_mmproj(info: dict) -> dict[str, np.ndarray]:
    s: TinySpec = info["spec"]
    keep = s.v_layers - 1  # hidden_states[-2]
    clip = clip_stored(info)
    out = {
        "v.class_embd": clip["embeddings.class_embedding"],
        "v.patch_embd.weight": clip["embeddings.patch_embedding.weight"],
        "v.position_embd.weight": clip["embeddings.position_embedding.weight"],
        "v.pre_ln.weight": clip["pre_layrnorm.weight"], "v.pre_ln.bias": clip["pre_layrnorm.bias"],
    }
    for name, arr in clip.items():
        if name.startswith("encoder.layers."):
            _, _, i, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            if int(i) < keep:
                out[f"v.blk.{i}.{CLIP_LAYER_EXPECTED[part]}.{kind}"] = arr
    for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
        out[f"mm.{k}"] = info["stored"][f"model.mm_projector.{k}"]
    return out


def read_tensors(path) -> dict[str, tuple[QT, np.ndarray]]:
    reader = GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.tensor_type in (QT.F32, QT.F16):
            data = np.array(t.data, dtype=np.float32).reshape(shape)
        else:
            data = dequantize(np.array(t.data), t.tensor_type).reshape(shape)
        out[t.name] = (QT(t.tensor_type), data)
    return out


def field(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"missing key {key}"
    return f.contents()


LAYOUTS = [
    TinySpec(arch="qwen2", tower="inside"),
    TinySpec(arch="qwen2", tower="folder", tower_prefix=False, dtype="BF16", shards=3),
    TinySpec(arch="llama", tower="folder_abs", dtype="F16"),
    TinySpec(arch="llama", tower="inside", tower_prefix=False, shards=2),
]
LAYOUT_IDS = ["qwen2-inside-f32", "qwen2-folder-noprefix-bf16-sharded", "llama-folderabs-f16",
              "llama-inside-noprefix-sharded"]


@pytest.mark.parametrize("spec", LAYOUTS, ids=LAYOUT_IDS)
def test_f32_conversion_is_exact_for_every_tensor(spec, tiny, converted):
    info = tiny(spec)
    result = converted(spec, "F32", "f32")
    got_llm, got_mm = read_tensors(result.llm_path), read_tensors(result.mmproj_path)
    want_llm, want_mm = expected_llm(info), expected_mmproj(info)
    assert set(got_llm) == set(want_llm)
    assert set(got_mm) == set(want_mm), "post-LayerNorm and unused blocks must not be written"
    for name, want in {**want_llm, **want_mm}.items():
        qtype, got = got_llm.get(name) or got_mm[name]
        assert qtype == QT.F32
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=name)


@pytest.mark.parametrize("quant,mm_type", [("F16", "f16"), ("BF16", "q8_0"), ("Q8_0", "f16")])
def test_direct_types_stay_within_their_precision(quant, mm_type, tiny, converted):
    spec = TinySpec(arch="qwen2", tower="inside")
    info = tiny(spec)
    result = converted(spec, quant, mm_type)
    got = {**read_tensors(result.llm_path), **read_tensors(result.mmproj_path)}
    want = {**expected_llm(info), **expected_mmproj(info)}
    seen = set()
    for name, ref in want.items():
        qtype, arr = got[name]
        seen.add(qtype)
        ref = ref.astype(np.float32)
        if arr.ndim == 1 or name.endswith("norm.weight") or name == "v.position_embd.weight":
            assert qtype == QT.F32, name
        if qtype == QT.F32:
            np.testing.assert_array_equal(arr, ref, err_msg=name)
        elif qtype == QT.F16:
            np.testing.assert_allclose(arr, ref, rtol=1e-3, atol=1e-6, err_msg=name)
        elif qtype == QT.BF16:
            np.testing.assert_allclose(arr, ref, rtol=2 ** -8, atol=1e-30, err_msg=name)
        elif qtype == QT.Q8_0:
            blocks = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs((arr - ref).reshape(-1, 32))
            # half a step, plus 127 steps times the f16 rounding of the block scale
            assert (err <= blocks / 127 * (0.5 + 127 * 2 ** -11) + 1e-7).all(), name
        else:
            pytest.fail(f"{name}: unexpected type {qtype}")
    wanted = {"F16": QT.F16, "BF16": QT.BF16, "Q8_0": QT.Q8_0}[quant]
    assert wanted in seen
    assert got["v.patch_embd.weight"][0] in (QT.F16, QT.F32)


def test_mmproj_metadata_matches_clip_cpp_expectations(converted):
    result = converted(TinySpec(), "F32", "f32")
    r = GGUFReader(str(result.mmproj_path))
    assert field(r, "general.architecture") == "clip"
    assert field(r, "clip.projector_type") == "mlp"
    assert field(r, "clip.has_vision_encoder") is True
    assert field(r, "clip.vision.block_count") == 2  # hidden_states[-2] of a 3-block tower
    fl = r.get_field("clip.vision.feature_layer")
    assert fl.types == [GGUFValueType.ARRAY, GGUFValueType.INT32] and fl.contents() == [2]
    assert field(r, "clip.vision.image_size") == 336 and field(r, "clip.vision.patch_size") == 14
    assert field(r, "clip.vision.embedding_length") == 32 and field(r, "clip.vision.feed_forward_length") == 64
    assert field(r, "clip.vision.projection_dim") == 64
    np.testing.assert_allclose(field(r, "clip.vision.image_mean"), [0.48145466, 0.4578275, 0.40821073], rtol=1e-6)
    np.testing.assert_allclose(field(r, "clip.vision.image_std"), [0.26862954, 0.26130258, 0.27577711], rtol=1e-6)
    assert r.get_field("clip.use_gelu") is None  # CLIP uses quick_gelu, clip.cpp's default
    assert not [t.name for t in r.tensors if "post_ln" in t.name]


def test_qwen2_llm_metadata_and_vocab(tiny, converted):
    info = tiny(TinySpec())
    r = GGUFReader(str(converted(TinySpec(), "F32", "f32").llm_path))
    tok = json.loads((info["ckpt"] / "tokenizer.json").read_text())
    assert field(r, "general.architecture") == "qwen2"
    assert field(r, "qwen2.block_count") == 2 and field(r, "qwen2.embedding_length") == 64
    assert field(r, "qwen2.attention.head_count") == 4 and field(r, "qwen2.attention.head_count_kv") == 2
    assert field(r, "qwen2.rope.freq_base") == pytest.approx(1e6)
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "qwen2"
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == 384  # padded to the embedding rows
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text and types[i] == TokenType.NORMAL
    eos = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|endoftext|>")
    for t in tok["added_tokens"]:
        assert tokens[t["id"]] == t["content"] and types[t["id"]] == TokenType.CONTROL
    n_real = max(t["id"] for t in tok["added_tokens"]) + 1
    assert tokens[n_real:] == [f"[PAD{i}]" for i in range(n_real, 384)]
    assert set(types[n_real:]) == {TokenType.UNUSED}
    assert len(field(r, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    assert field(r, "tokenizer.ggml.eos_token_id") == eos
    assert field(r, "tokenizer.ggml.bos_token_id") == eos  # explicit, never llama.cpp's fallback 11
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    # The template llama.cpp's tools and servers render (`--jinja`) gives the release's prompt, written out here
    # by hand from the release (docs/RELEASE.md): no system turn, the image markers first (libmtmd's marker,
    # `<__media__>`, where the release writes `<image>`), ' \n' after answers.
    import jinja2

    template = jinja2.Environment(loader=jinja2.BaseLoader()).from_string(field(r, "tokenizer.chat_template"))
    rendered = template.render(messages=[
        {"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A chest CT."},
        {"role": "user", "content": "And the lung?"}], add_generation_prompt=True)
    assert rendered == ("<|user|>\n<__media__>\nWhat is it?\n<|assistant|>\nA chest CT. \n"
                        "<|user|>\nAnd the lung?\n<|assistant|>\n")


def test_llama_sentencepiece_vocab(tiny, converted):
    import sentencepiece as spm

    spec = TinySpec(arch="llama", tower="folder_abs", dtype="F16")
    info = tiny(spec)
    r = GGUFReader(str(converted(spec, "F32", "f32").llm_path))
    sp = spm.SentencePieceProcessor(model_file=str(info["ckpt"] / "tokenizer.model"))
    tokens, scores, types = (field(r, k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                   "tokenizer.ggml.token_type"))
    assert field(r, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == 704
    for i in range(sp.get_piece_size()):
        assert tokens[i] == sp.id_to_piece(i)
        assert scores[i] == pytest.approx(sp.get_score(i))
        if sp.is_byte(i):
            assert types[i] == TokenType.BYTE
    assert tokens[sp.piece_to_id("<0x0A>")] == "<0x0A>"
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.ggml.add_space_prefix") is True
    assert field(r, "tokenizer.ggml.bos_token_id") == 1 and field(r, "tokenizer.ggml.eos_token_id") == 2
    assert field(r, "llama.rope.dimension_count") == 16


def test_manifest_records_files_and_hashes(converted):
    import hashlib

    result = converted(TinySpec(), "F32", "f32")
    m = json.loads(result.manifest_path.read_text())
    assert m["llm_file"] == result.llm_path.name == "tiny-F32.gguf"
    assert m["mmproj_file"] == result.mmproj_path.name == "mmproj-tiny-f32.gguf"
    assert m["llm_sha256"] == hashlib.sha256(result.llm_path.read_bytes()).hexdigest()
    assert m["mmproj_sha256"] == hashlib.sha256(result.mmproj_path.read_bytes()).hexdigest()
    assert m["quant"] == "F32" and m["arch"] == "qwen2" and m["converter"].startswith("huatuo-local ")
    assert not list(result.llm_path.parent.glob(".*partial")), "no temporary file may remain"


def test_pytorch_bin_tower_is_read_without_torch_in_the_converter(tiny, tmp_path):
    """The older `.bin` variant: the tower folder ships pytorch_model.bin only. The test writes it with torch;
    the converter reads it in a process where torch cannot be imported at all."""
    import subprocess
    import sys

    import torch

    spec = TinySpec(arch="qwen2", tower="folder", seed=3)
    info = tiny(spec)
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(info["ckpt"], ckpt)
    tower = ckpt / "vit" / "tiny_clip"
    from huatuo_local.convert.safetensors import SafetensorsFile

    st = SafetensorsFile(tower / "model.safetensors")
    state = {n: torch.from_numpy(r.load_f32().copy()) for n, r in st.tensors.items()}
    (tower / "model.safetensors").unlink()
    torch.save(state, tower / "pytorch_model.bin")
    code = ("import sys\nsys.modules['torch'] = None  # `import torch` raises ImportError from here on\n"
            "from huatuo_local.convert.pipeline import convert\n"
            f"convert({str(ckpt)!r}, {str(tmp_path / 'out')!r}, quant='F32', mmproj_type='f32', name='bin')\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = read_tensors(tmp_path / "out" / "mmproj-bin-f32.gguf")
    for name, want in expected_mmproj(info).items():
        np.testing.assert_array_equal(got[name][1], want, err_msg=name)
