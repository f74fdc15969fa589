"""Run-time proof that the loaded libmtmd encodes a LLaVA (CLIP) image correctly.

A tiny seeded CLIP tower + `mlp` projector is written as an mmproj GGUF (beside a tiny
LLM it needs to load), one image is encoded through libmtmd, and the result is compared
with a small numpy implementation of the same tower. The same numpy code also computes
what the known upstream bug (ggml-org/llama.cpp#25814: class token appended after the
patches) would give, so a failing library is named precisely. Takes milliseconds; the
verdict is cached per library file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from huatuo_local.models.bytelevel import bytes_to_unicode

IMAGE_SIZE, PATCH, V_HIDDEN, V_HEADS, V_FFN, V_LAYERS = 28, 14, 16, 2, 24, 2
LLM_HIDDEN = 16
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
EPS = 1e-5
TOLERANCE = 2e-2  # relative to the output's scale; the bug moves it by order 1

FIX_HINT = "rebuild the engine with `python3 scripts/bootstrap.py` (it applies the fix)"


@dataclass
class ProbeResult:
    ok: bool
    verdict: str  # "correct", "class-token-last bug", "mismatch", "error"
    max_abs_diff: float
    scale: float
    library: str
    detail: str = ""


def _weights(seed: int = 1234) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_pos = (IMAGE_SIZE // PATCH) ** 2 + 1
    w: dict[str, np.ndarray] = {
        "v.class_embd": rng.standard_normal(V_HIDDEN),
        "v.patch_embd.weight": rng.standard_normal((V_HIDDEN, 3, PATCH, PATCH)) * 0.05,
        "v.position_embd.weight": rng.standard_normal((n_pos, V_HIDDEN)),
        "v.pre_ln.weight": 1 + 0.1 * rng.standard_normal(V_HIDDEN),
        "v.pre_ln.bias": 0.1 * rng.standard_normal(V_HIDDEN),
    }
    for i in range(V_LAYERS):
        p = f"v.blk.{i}."
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w[p + t + ".weight"] = rng.standard_normal((V_HIDDEN, V_HIDDEN)) / np.sqrt(V_HIDDEN)
            w[p + t + ".bias"] = 0.1 * rng.standard_normal(V_HIDDEN)
        for t in ("ln1", "ln2"):
            w[p + t + ".weight"] = 1 + 0.1 * rng.standard_normal(V_HIDDEN)
            w[p + t + ".bias"] = 0.1 * rng.standard_normal(V_HIDDEN)
        w[p + "ffn_up.weight"] = rng.standard_normal((V_FFN, V_HIDDEN)) / np.sqrt(V_HIDDEN)
        w[p + "ffn_up.bias"] = 0.1 * rng.standard_normal(V_FFN)
        w[p + "ffn_down.weight"] = rng.standard_normal((V_HIDDEN, V_FFN)) / np.sqrt(V_FFN)
        w[p + "ffn_down.bias"] = 0.1 * rng.standard_normal(V_HIDDEN)
    w["mm.0.weight"] = rng.standard_normal((LLM_HIDDEN, V_HIDDEN)) / np.sqrt(V_HIDDEN)
    w["mm.0.bias"] = 0.1 * rng.standard_normal(LLM_HIDDEN)
    w["mm.2.weight"] = rng.standard_normal((LLM_HIDDEN, LLM_HIDDEN)) / np.sqrt(LLM_HIDDEN)
    w["mm.2.bias"] = 0.1 * rng.standard_normal(LLM_HIDDEN)
    return {k: v.astype(np.float32) for k, v in w.items()}


def probe_image(seed: int = 99) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * w + b


def reference_embeddings(image: np.ndarray, w: dict[str, np.ndarray], class_token_last: bool = False) -> np.ndarray:
    """The tower + projector in float64 numpy; `class_token_last` reproduces the upstream bug."""
    x = (image.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)  # H, W, C
    g = IMAGE_SIZE // PATCH
    patches = x.reshape(g, PATCH, g, PATCH, 3).transpose(0, 2, 4, 1, 3).reshape(g * g, 3 * PATCH * PATCH)
    kernel = w["v.patch_embd.weight"].astype(np.float64).reshape(V_HIDDEN, -1)
    emb = patches @ kernel.T
    cls = w["v.class_embd"][None].astype(np.float64)
    h = np.concatenate([emb, cls] if class_token_last else [cls, emb])
    h = h + w["v.position_embd.weight"]
    h = _layer_norm(h, w["v.pre_ln.weight"], w["v.pre_ln.bias"])
    d = V_HIDDEN // V_HEADS
    for i in range(V_LAYERS):
        p = f"v.blk.{i}."
        a = _layer_norm(h, w[p + "ln1.weight"], w[p + "ln1.bias"])
        q, k, v = (a @ w[p + f"attn_{t}.weight"].T + w[p + f"attn_{t}.bias"] for t in "qkv")
        q, k, v = (t.reshape(-1, V_HEADS, d).transpose(1, 0, 2) for t in (q, k, v))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(-1, V_HIDDEN)
        h = h + o @ w[p + "attn_out.weight"].T + w[p + "attn_out.bias"]
        a = _layer_norm(h, w[p + "ln2.weight"], w[p + "ln2.bias"])
        f = a @ w[p + "ffn_up.weight"].T + w[p + "ffn_up.bias"]
        f = f / (1 + np.exp(-1.702 * f))  # quick_gelu
        h = h + f @ w[p + "ffn_down.weight"].T + w[p + "ffn_down.bias"]
    feats = h[1:]  # libmtmd always drops row 0, the class token's place
    y = feats @ w["mm.0.weight"].T + w["mm.0.bias"]
    y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))  # ggml_gelu
    return y @ w["mm.2.weight"].T + w["mm.2.bias"]


def classify(got: np.ndarray, correct: np.ndarray, buggy: np.ndarray, library: str) -> ProbeResult:
    scale = float(np.abs(correct).max())
    diff = float(np.abs(got - correct).max()) if got.shape == correct.shape else float("inf")
    if diff <= TOLERANCE * scale:
        return ProbeResult(True, "correct", diff, scale, library)
    bug_diff = float(np.abs(got - buggy).max()) if got.shape == buggy.shape else float("inf")
    if bug_diff <= TOLERANCE * scale:
        return ProbeResult(False, "class-token-last bug", diff, scale, library,
                           "libmtmd appends the CLIP class token after the patches (llama.cpp#25814)")
    return ProbeResult(False, "mismatch", diff, scale, library, "libmtmd's image embeddings match no known layout")


def write_probe_pair(folder: Path) -> tuple[Path, Path]:
    """A 1-layer LLM with a byte vocabulary and the probe's mmproj, both F32."""
    from gguf import GGUFValueType, GGUFWriter

    w = _weights()
    mm = folder / "probe-mmproj.gguf"
    writer = GGUFWriter(mm, "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    for key, val in (("image_size", IMAGE_SIZE), ("patch_size", PATCH), ("embedding_length", V_HIDDEN),
                     ("feed_forward_length", V_FFN), ("projection_dim", LLM_HIDDEN),
                     ("attention.head_count", V_HEADS), ("block_count", V_LAYERS)):
        writer.add_uint32(f"clip.vision.{key}", val)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", EPS)
    writer.add_key_value("clip.vision.feature_layer", [V_LAYERS], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    writer.add_array("clip.vision.image_mean", list(MEAN))
    writer.add_array("clip.vision.image_std", list(STD))
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


def library_path() -> Path:
    """The libmtmd the engine loads (its identity keys the cached verdict)."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libmtmd.so", "libmtmd.dylib", "mtmd.dll"):
        if (lib_dir / name).exists():
            return lib_dir / name
    return lib_dir


def _cache_file() -> Path:
    base = os.environ.get("HUATUO_LOCAL_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huatuo-local")
    return Path(base) / "vision-probe.json"


def _library_key(lib: Path) -> str:
    st = lib.stat()
    return hashlib.sha256(f"{lib.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]


def run_probe() -> ProbeResult:
    """Encode the probe image through libmtmd now (no cache)."""
    from .engine import Engine, EngineError, EngineOptions

    lib = str(library_path())
    w = _weights()
    image = probe_image()
    correct = reference_embeddings(image, w)
    buggy = reference_embeddings(image, w, class_token_last=True)
    with tempfile.TemporaryDirectory(prefix="huatuo-probe-") as tmp:
        llm, mm = write_probe_pair(Path(tmp))
        try:
            with Engine(llm, mm, EngineOptions(n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1)) as engine:
                from PIL import Image

                got = engine.image_embeddings(Image.fromarray(image))
        except EngineError as exc:
            return ProbeResult(False, "error", float("inf"), 0.0, lib, str(exc))
    return classify(got.astype(np.float64), correct, buggy, lib)


def check_library(use_cache: bool = True) -> ProbeResult:
    """The cached verdict for the loaded library, probing once when there is none."""
    lib = library_path()
    cache = _cache_file()
    key = _library_key(lib) if lib.is_file() else ""
    if use_cache and key and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return ProbeResult(**data["result"])
        except (OSError, ValueError, TypeError, KeyError):
            pass
    result = run_probe()
    if key and result.verdict != "error":
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".partial")
            tmp.write_text(json.dumps({"key": key, "result": asdict(result)}))
            tmp.replace(cache)
        except OSError:
            pass
    return result
