"""Fidelity: huatuo-local against the PyTorch reference of the release, on the same weights.

Figures are asserted with tolerances; FIDELITY.md records the measured values.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import engine_options
from PIL import Image
from tiny_models import TinySpec

# Seeds whose top-1/top-2 logit gaps along the greedy path stay well above the numeric
# residue (checked in `assert_decisive`), so that identical tokens mean something.
CASES = [("qwen2", 8), ("qwen2", 9), ("llama", 8), ("llama", 9)]
PROMPT_1 = "What does the picture show?"
PROMPT_3 = "Compare these three scans. Which one is abnormal?"


def make_image(path, w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    base = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    # Smooth structure as well as noise, so resampling differences are visible.
    yy, xx = np.mgrid[0:h, 0:w]
    base[..., 0] = ((np.sin(xx / 7.0) + 1) * 120).astype(np.uint8)
    img = Image.fromarray(base)
    if mode == "RGBA":
        alpha = Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8))
        img = img.convert("RGBA")
        img.putalpha(alpha)
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def setup(tiny, converted, tmp_path_factory):
    cache = {}

    def get(arch: str, seed: int):
        if (arch, seed) not in cache:
            from reference import Reference

            spec = TinySpec(arch=arch, seed=seed, tower="folder" if seed % 2 == 0 else "inside")
            info = tiny(spec)
            folder = tmp_path_factory.mktemp("img")
            images = [make_image(folder / f"{i}.png", w, h, seed * 10 + i)
                      for i, (w, h) in enumerate([(300, 200), (180, 260), (336, 336)])]
            cache[(arch, seed)] = (info, converted(spec, "F32", "f32"), Reference(info), images)
        return cache[(arch, seed)]

    return get


def open_session(result, greedy=True):
    from huatuo_local.runtime.core.sampling import SamplingParams
    from huatuo_local.runtime.core.session import Session
    from huatuo_local.runtime.engine.engine import Engine

    engine = Engine(result.llm_path, result.mmproj_path, engine_options(n_ctx=4096, kv_type="f32"),
                    eos_id=result.manifest.eos_id)
    return Session(engine, SamplingParams(temperature=0, repetition_penalty=1.2, max_new_tokens=32))


def cosine_rows(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_decisive(ref_logits, tokens, residue):
    """Every greedy choice wins by more than twice the residue (after the penalty).

    A flip needs another token's error minus the winner's to exceed the gap, and that
    difference is at most 2 x residue: above it, agreement cannot be a coin toss."""
    for step, logits in enumerate(ref_logits[: len(tokens)]):
        scores = logits.copy()
        seen = sorted(set(tokens[:step]))
        if seen:
            scores[seen] = np.where(scores[seen] < 0, scores[seen] * 1.2, scores[seen] / 1.2)
        top2 = np.sort(scores)[-2:]
        assert top2[1] - top2[0] > 2 * residue, f"step {step}: gap {top2[1] - top2[0]:.4f} vs residue {residue:.4f}"


@pytest.mark.parametrize("arch,seed", CASES)
def test_image_embeddings_match_the_reference(arch, seed, setup):
    from huatuo_local.runtime.images.loader import load_rgb, prepare

    _, result, ref, images = setup(arch, seed)
    session = open_session(result)
    for path in images:
        ours = session.engine.image_embeddings(prepare(load_rgb(path), session.engine.vision))
        theirs = ref.image_features(path).numpy()
        assert ours.shape == theirs.shape == (576, 64)
        cos = cosine_rows(ours, theirs)
        assert cos.min() >= 0.99999, cos.min()
        # llama.cpp's projector GELU is the tanh approximation, the release's is erf: a small,
        # measured residue (FIDELITY.md), not a layout error (which moves values by O(scale)).
        assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max() * 2
    session.engine.close()


@pytest.mark.parametrize("arch,seed", CASES)
@pytest.mark.parametrize("n_images", [1, 3])
def test_logits_and_greedy_tokens_match_the_reference(arch, seed, n_images, setup):
    _, result, ref, images = setup(arch, seed)
    text = PROMPT_1 if n_images == 1 else PROMPT_3
    prompt = "<|user|>\n" + "<image>\n" * n_images + text + "\n<|assistant|>\n"
    want_tokens, want_logits = ref.generate(prompt, images[:n_images])
    session = open_session(result)
    got_logits = []
    session.logit_hook = lambda x: got_logits.append(x.astype(np.float64))
    reply = session.ask(text, images[:n_images])
    assert reply.tokens == want_tokens
    assert len(want_tokens) >= 8
    worst = 0.0
    for got, want in zip(got_logits, want_logits):
        diff = np.abs(got - want).max() / (want.max() - want.min())
        worst = max(worst, diff)
    assert worst <= 1e-3, worst
    residue = max(np.abs(g - w).max() for g, w in zip(got_logits, want_logits))
    assert_decisive(want_logits, want_tokens, residue)
    assert reply.text == ref.tokenizer.decode(want_tokens, skip_special_tokens=True).strip()
    session.engine.close()


@pytest.mark.parametrize("arch,seed,prefill", [(*CASES[0], False), (*CASES[2], False), (*CASES[0], True),
                                               (*CASES[2], True)])
def test_second_turn_matches_the_release_rebuilding_the_whole_prompt(arch, seed, prefill, setup):
    """Turn 2 adds two images; the release re-renders the history, we reuse the KV cache.

    With `prefill`, the start every follow-up shares is evaluated before the question is known
    (as the REPL does while the user types): the answer must not change, turn 2 evaluates less.
    """
    _, result, ref, images = setup(arch, seed)
    session = open_session(result)
    first = session.ask(PROMPT_1, images[:1])
    reused_before = session.counters.tokens_reused
    prefilled = session.prefill_next_turn() if prefill else 0
    kept = session.positions
    second = session.ask(PROMPT_3, images[1:3])
    if prefill:
        assert prefilled >= 2, "the answer's ending and the user tag"
        assert second.counters.tokens_reused == kept, "turn 2 reuses everything the pre-fill evaluated"
    prompt = ("<|user|>\n<image>\n" + PROMPT_1 + "\n<|assistant|>\n" + first.text + " \n"
              + "<|user|>\n<image>\n<image>\n" + PROMPT_3 + "\n<|assistant|>\n")
    want_tokens, _ = ref.generate(prompt, images[:3])
    assert second.tokens == want_tokens
    assert session.counters.images_encoded == 3, "the first image must not be encoded again"
    assert session.counters.tokens_reused - reused_before >= 576
    session.engine.close()


IMAGE_KINDS = [
    ("square", 336, 336, "RGB"), ("wide", 500, 200, "RGB"), ("tall", 150, 420, "RGB"), ("tiny", 5, 3, "RGB"),
    ("large", 2000, 1500, "RGB"), ("rgba", 300, 240, "RGBA"), ("palette", 260, 300, "P"),
    ("grayscale", 400, 330, "L"),
]


@pytest.mark.parametrize("kind,w,h,mode", IMAGE_KINDS, ids=[k[0] for k in IMAGE_KINDS])
def test_preprocessing_gives_the_reference_pixels_exactly(kind, w, h, mode, setup, tmp_path):
    from huatuo_local.runtime.images.loader import load_rgb, prepare

    _, result, ref, _ = setup("qwen2", 8)
    from huatuo_local.models.gguf_check import read_fields
    from huatuo_local.runtime.images.loader import VisionInput

    meta = read_fields(result.mmproj_path, ("clip.vision.image_size", "clip.vision.image_mean",
                                                 "clip.vision.image_std"))
    vision = VisionInput(int(meta["clip.vision.image_size"]), tuple(meta["clip.vision.image_mean"]))
    path = make_image(tmp_path / f"{kind}.png", w, h, 7, mode)
    ours = np.asarray(prepare(load_rgb(path), vision), dtype=np.float32)  # what llama.cpp receives
    mean, std = np.array(meta["clip.vision.image_mean"]), np.array(meta["clip.vision.image_std"])
    ours = ((ours / 255 - mean) / std).transpose(2, 0, 1)
    theirs = ref.pixel_values(path)[0].numpy()
    assert ours.shape == theirs.shape == (3, 336, 336)
    # Equal uint8 pixels leave only float rounding; one grey level off would be 1/255/0.27 = 0.015.
    assert np.abs(ours - theirs).max() < 1e-4


def test_llama_cpp_letterboxing_would_change_the_image(setup, tmp_path):
    """Handing llama.cpp the raw image (its own resize-then-pad) moves the embeddings measurably."""
    from huatuo_local.runtime.images.loader import load_rgb, prepare

    _, result, ref, images = setup("qwen2", 8)
    session = open_session(result)
    theirs = ref.image_features(images[0]).numpy()
    ours = session.engine.image_embeddings(prepare(load_rgb(images[0]), session.engine.vision))
    raw = session.engine.image_embeddings(load_rgb(images[0]))  # 300x200, letterboxed by llama.cpp
    ours_err = np.abs(ours - theirs).max()
    raw_err = np.abs(raw - theirs).max()
    assert raw_err > 20 * ours_err, (raw_err, ours_err)
    session.engine.close()
