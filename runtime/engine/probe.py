"""Run-time proof that the loaded libmtmd encodes a LLaVA (CLIP) image correctly.

A tiny seeded CLIP tower + `mlp` projector is written as an mmproj GGUF (probe_files.py, beside a
tiny LLM it needs to load), one image is encoded through libmtmd, and the result is compared with a
small numpy implementation of the same tower (clip_reference.py), which also computes what the known
upstream bug (ggml-org/llama.cpp#25814: class token appended after the patches) would give, so a
failing library is named precisely. Takes milliseconds; the verdict is cached per library file.
`vision_warning` is what the layers above call before they encode an image.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from huatuo_local.runtime.engine.clip_reference import probe_image, reference_embeddings, weights
from huatuo_local.runtime.engine.engine import Engine, EngineError, EngineOptions
from huatuo_local.runtime.engine.probe_files import write_probe_pair

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

    lib = str(library_path())
    w = weights()
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


def vision_warning(allow_unverified: bool) -> str | None:
    """Refuse to encode images with a libmtmd that fails the probe: an EngineError naming the fix. With
    `allow_unverified`, the warning to show beside each answer instead. None when the library passes.
    The verdict is cached on disk by the library's identity (check_library); callers ask once per model."""
    result = check_library()
    if result.ok:
        return None
    message = (f"{result.library}: this llama.cpp build encodes LLaVA images wrongly ({result.verdict}: "
               f"{result.detail or 'see huatuo-local doctor'}); {FIX_HINT}")
    if not allow_unverified:
        raise EngineError(message + ", or pass --allow-unverified-vision to answer anyway")
    return "warning: image encoding is unverified; " + message
