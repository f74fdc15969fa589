"""How sure the model was, beside whether it was right: each multiple-choice question's option probabilities,
their accuracy, the expected calibration error and a reliability diagram.

The probabilities are the model's own: at the answer's first position, the raw scores of the option letters'
tokens (A, B, C ... as single tokens), turned into a distribution over those letters alone (a softmax over
them). That is the first token of the release's instruction ("Answer with the option's letter from the given
choices directly."), so the letter with the highest probability is the model's pick when it is made to answer
with a letter; the release's own score instead reads the letter out of the generated text (a sampled answer
at temperature 0.2 that may not start with a letter, or name none). Both are reported; they differ where the
sampled text strays from the most likely letter.

Expected calibration error (ECE): the questions binned by the confidence of the pick (10 equal-width bins), the
gap between each bin's accuracy and its mean confidence, weighted by the bin's share of questions.
"""

from __future__ import annotations

import math
from pathlib import Path

BINS = 10


def option_probabilities(scores: list[float]) -> list[float]:
    """Softmax over the option letters' raw scores (float64; -inf scores get 0)."""
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        return [1 / len(scores)] * len(scores) if scores else []
    top = max(finite)
    weights = [math.exp(s - top) if math.isfinite(s) else 0.0 for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def calibrated_rows(rows: list[dict]) -> list[tuple[float, bool]]:
    """(confidence of the pick, the pick was right) of each asked question that has option probabilities."""
    out = []
    for r in rows:
        probs = r.get("option_probs")
        if r.get("error") or not probs or r.get("right") is None:
            continue
        pick = max(probs, key=probs.get)
        out.append((float(probs[pick]), pick == r["right"]))
    return out


def reliability(pairs: list[tuple[float, bool]], bins: int = BINS) -> list[dict]:
    """Per confidence bin: its range, questions, mean confidence and accuracy."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(c, ok) for c, ok in pairs if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        out.append({"low": lo, "high": hi, "questions": len(inside),
                    "confidence": sum(c for c, _ in inside) / len(inside) if inside else None,
                    "accuracy": sum(ok for _, ok in inside) / len(inside) if inside else None})
    return out


def expected_calibration_error(pairs: list[tuple[float, bool]], bins: int = BINS) -> float:
    n = len(pairs)
    if n == 0:
        return 0.0
    return sum(b["questions"] / n * abs(b["accuracy"] - b["confidence"])
               for b in reliability(pairs, bins) if b["questions"])


def summary(rows: list[dict]) -> dict | None:
    """The option-probability figures of a run (None when no question has them)."""
    pairs = calibrated_rows(rows)
    if not pairs:
        return None
    right = sum(ok for _, ok in pairs)
    return {"questions": len(pairs), "correct": right, "accuracy": round(100 * right / len(pairs), 2),
            "mean_confidence": round(100 * sum(c for c, _ in pairs) / len(pairs), 2),
            "ece": round(100 * expected_calibration_error(pairs), 2), "bins": reliability(pairs)}


def write_diagram(path: Path, figures: dict, title: str) -> None:
    """The reliability diagram as a PNG: per bin, accuracy (bars) against confidence (the diagonal is perfect
    calibration), with each bin's question count. Drawn with Pillow (no plotting library)."""
    import io

    from huatuo_local.models.private import write_private
    from PIL import Image, ImageDraw

    w, h, left, bottom, top, right = 560, 480, 60, 60, 50, 20
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pw, ph = w - left - right, h - top - bottom

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * pw, top + (1 - y) * ph

    d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for i in range(11):
        t = i / 10
        d.line([xy(t, 0), (xy(t, 0)[0], xy(t, 0)[1] + 4)], fill="black")
        d.text((xy(t, 0)[0] - 8, xy(t, 0)[1] + 8), f"{t:.1f}", fill="black")
        d.line([xy(0, t), (xy(0, t)[0] - 4, xy(0, t)[1])], fill="black")
        d.text((xy(0, t)[0] - 32, xy(0, t)[1] - 6), f"{t:.1f}", fill="black")
    for b in figures["bins"]:
        if not b["questions"]:
            continue
        x0, y0 = xy(b["low"], b["accuracy"])
        x1, y1 = xy(b["high"], 0)
        d.rectangle([x0 + 2, y0, x1 - 2, y1], fill=(70, 130, 180), outline=(40, 80, 120))
        d.text((x0 + 4, y0 - 14), str(b["questions"]), fill="black")
    d.line([xy(0, 0), xy(1, 1)], fill=(200, 40, 40), width=2)
    d.text((left, 12), title[:80], fill="black")
    d.text((left, 28), f"ECE {figures['ece']:.1f} %  accuracy {figures['accuracy']:.1f} %  "
                       f"mean confidence {figures['mean_confidence']:.1f} %  ({figures['questions']} questions)",
           fill="black")
    d.text((left + pw / 2 - 60, h - 24), "confidence of the pick", fill="black")
    d.text((4, top - 16), "accuracy", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_private(path, buf.getvalue())
