"""`huatuo-local verify --reference F16_MODEL QUANTS...`: what quantizing cost, measured like `verify`.

The reference is a lossless conversion of the same checkpoint (F16, BF16 or F32), so a user with real
weights can measure their own quants without PyTorch. For each prompt (images and a question, by default
held-out medical images no importance matrix was computed from), the reference's greedy answer is fed
back to every model (teacher forcing); at each position the KL divergence from the reference's
next-token distribution and whether the most likely token is the same. The image embeddings are
compared too (a quantized projector changes them; a shared F16 one gives cosine 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huatuo_local.models import gguf_keys as keys
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.prompt import Turn
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.verify.compare import VerifyRow, embedding_difference, kl_divergence, log_softmax, measuring


@dataclass
class Prompt:
    images: list[Path]
    question: str


@dataclass
class _Answer:
    images: list[np.ndarray]  # the image embeddings
    tokens: list[int]
    log_probs: list[np.ndarray]  # float32, one per answer position


def _run(model: str | Path, prompts: list[Prompt], n_tokens: int, follow: list[_Answer] | None,
         config: ModelConfig | None) -> list[_Answer]:
    """Each prompt through `model`: its own greedy answer, or (with `follow`) the reference's tokens fed back."""
    from huatuo_local.runtime.core.loading import open_model
    from huatuo_local.runtime.core.session import Session

    out = []
    with open_model(measuring(config, model)).engine as engine:
        session = Session(engine)
        for k, prompt in enumerate(prompts):
            pictures = session.prepare_images(prompt.images)
            embeddings = [engine.image_embeddings(p.picture).astype(np.float32) for p in pictures]
            items = session.items_for([Turn(prompt.question, len(pictures))], pictures)
            tokens = follow[k].tokens if follow else []
            answer = _Answer(embeddings, [], [])
            for step in range(len(tokens) if follow else n_tokens):
                logits = session.evaluate(items + answer.tokens).astype(np.float64)
                answer.log_probs.append(log_softmax(logits).astype(np.float32))
                token = tokens[step] if follow else int(np.argmax(logits))
                if not follow and token == engine.eos_id:
                    break
                answer.tokens.append(token)
            session.clear()
            out.append(answer)
        session.close()
    return out


def shape_of(m) -> dict[str, object]:
    """What must be equal for two models to be quants of one checkpoint: architecture, widths, depth, the
    vocabulary, and the image embeddings' width."""
    from huatuo_local.models.gguf_check import check_gguf

    llm, mm = check_gguf(m.llm_path, "llm"), check_gguf(m.mmproj_path, "mmproj")
    f = llm.fields
    return {"architecture": llm.arch, "embedding width": f.get(f"{llm.arch}.embedding_length"),
            "layers": f.get(f"{llm.arch}.block_count"), "vocabulary": llm.tensors.get("token_embd.weight", (0, ()))[1],
            "image embedding width": mm.fields.get(keys.PROJECTION_DIM)}


def check_comparable(reference, models: list) -> list[str]:
    """Refuse, in one line, a model that is not a quant of the reference's checkpoint (its logits could not
    even be compared); return the notes to print (a reference that is not lossless)."""
    from huatuo_local.models.store import LOSSLESS

    want = shape_of(reference)
    for m in models:
        got = shape_of(m)
        differ = [k for k in want if want[k] != got[k]]
        if differ:
            k = differ[0]
            raise HuatuoError(f"{m.ref} is not a quant of {reference.ref}'s model ({k} {got[k]} vs {want[k]}); "
                              "compare quants of one checkpoint")
    if reference.quant.upper() not in LOSSLESS:
        return [f"note: the reference {reference.ref} is {reference.quant or 'of unknown type'}, not lossless (F16, "
                "BF16 or F32): the figures are differences from it, not what quantizing cost"]
    return []


def compare_quants(reference: str | Path, models: list[str | Path], prompts: list[Prompt], n_tokens: int = 32,
                   config: ModelConfig | None = None, on_note=None) -> list[VerifyRow]:
    """Per model: image-embedding cosine (min) and largest difference, KL mean/max and top-1 agreement
    against `reference` over every answer position of every prompt. `on_note(text)` hears, before the work
    starts, what the user should know (a reference that is not lossless)."""
    from huatuo_local.models.store import resolve

    ref, resolved = resolve(str(reference)), [resolve(str(m)) for m in models]
    for note in check_comparable(ref, resolved):
        if on_note is not None:
            on_note(note)
    want = _run(reference, prompts, n_tokens, None, config)
    rows = []
    for model, m in zip(models, resolved):
        got = _run(model, prompts, n_tokens, want, config)
        cos, mx, kls, agree = [], 0.0, [], 0
        for w, g in zip(want, got):
            for a, b in zip(w.images, g.images):
                c, d = embedding_difference(a.astype(np.float64), b.astype(np.float64))
                cos.append(c)
                mx = max(mx, d)
            for p, q in zip(w.log_probs, g.log_probs):
                kls.append(kl_divergence(p.astype(np.float64), q.astype(np.float64)))
                agree += int(np.argmax(p) == np.argmax(q))
        rows.append(VerifyRow(m.ref, min(cos) if cos else float("nan"), mx,
                              float(np.mean(kls)), float(np.max(kls)), agree / max(len(kls), 1), len(kls)))
    return rows
