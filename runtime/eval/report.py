"""Scoring an eval run the release's way, with intervals, and comparing two runs (McNemar).

Accuracy = correct / kept records (micro), per model-card column, per dataset, per
`dataset_subset` and overall. Intervals are Wilson score intervals at 95 %, which stay inside
[0, 1] and behave at small counts (a 20-question dataset) where the normal approximation does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from huatuo_local.models.evaluation import CARD_ORDER, MODEL_CARD
from huatuo_local.runtime.eval import calibration

Z95 = 1.959963984540054


@dataclass
class Figure:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def interval(self) -> tuple[float, float]:
        """Wilson score interval at 95 %."""
        n, p = self.total, self.accuracy
        if n == 0:
            return 0.0, 0.0
        centre = (p + Z95 * Z95 / (2 * n)) / (1 + Z95 * Z95 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + Z95 * Z95 / (4 * n * n)) / (1 + Z95 * Z95 / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def as_dict(self) -> dict:
        lo, hi = self.interval()
        return {"correct": self.correct, "total": self.total, "accuracy": round(100 * self.accuracy, 2),
                "ci95": [round(100 * lo, 2), round(100 * hi, 2)]}


def _column_order(column: str) -> tuple[int, str]:
    """The model card's columns in its order, anything else after them by name."""
    return (CARD_ORDER.index(column) if column in CARD_ORDER else len(CARD_ORDER), column)


def _tally(rows: list[dict], key: str) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    for r in rows:
        f = out.setdefault(r[key], Figure(0, 0))
        f.total += 1
        f.correct += bool(r["correct"])
    return dict(sorted(out.items()))


def card_size(name: str) -> str:
    """Which model-card row a model is compared with: 34B for a 34B (or Yi/llama) model, else 7B."""
    low = name.lower()
    return "34B" if "34b" in low or "yi" in low else "7B"


def summarize(rows: list[dict], selected: int, model_name: str) -> dict:
    """Figures of a run; `selected` is how many records the run was asked to answer."""
    card = MODEL_CARD[card_size(model_name)]
    # A question that could not be asked (its image unreadable, too long for the context) says nothing
    # about the model: it is reported, and left out of every accuracy (the release skips it too).
    asked = [r for r in rows if not r.get("error")]
    columns = _tally(asked, "column")
    summary = {
        "answered": len(rows), "selected": selected, "complete": len(rows) >= selected,
        "asked": len(asked),
        "no_letter": sum(1 for r in asked if r.get("predicted") is None),
        "errors": len(rows) - len(asked),
        "overall": Figure(sum(bool(r["correct"]) for r in asked), len(asked)).as_dict(),
        "model_card_row": f"HuatuoGPT-Vision-{card_size(model_name)}",
        "columns": {c: {**columns[c].as_dict(), "model_card": card.get(c)}
                    for c in sorted(columns, key=_column_order)},
        "datasets": {k: f.as_dict() for k, f in _tally(asked, "dataset").items()},
        "subsets": {k: f.as_dict() for k, f in _tally(asked, "group").items()},
        # The option letters' probabilities at the answer's first token (runtime/eval/calibration.py).
        "options": calibration.summary(asked),
    }
    return summary


def _pct(d: dict) -> str:
    return f"{d['accuracy']:.1f} ({d['ci95'][0]:.1f}–{d['ci95'][1]:.1f})"


def markdown(summary: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    if not summary["complete"]:
        lines += [f"**Partial run:** {summary['answered']} of {summary['selected']} questions answered; "
                  "rerun the same command to continue.", ""]
    lines += [f"| model-card column | questions | ours: accuracy % (95 % CI) | {summary['model_card_row']} "
              "(model card) |", "|---|---|---|---|"]
    for col, d in summary["columns"].items():
        card = d["model_card"]
        lines.append(f"| {col} | {d['total']} | {_pct(d)} | {card if card is not None else '—'} |")
    o = summary["overall"]
    lines.append(f"| **overall (micro)** | {o['total']} | {_pct(o)} | — |")
    for name, key in (("dataset", "datasets"), ("dataset_subset", "subsets")):
        lines += ["", f"| {name} | questions | correct | accuracy % (95 % CI) |", "|---|---|---|---|"]
        for k, d in summary[key].items():
            lines.append(f"| {k} | {d['total']} | {d['correct']} | {_pct(d)} |")
    options = summary.get("options")
    if options:
        lines += ["", "| by the option letters' probabilities | questions | accuracy % | mean confidence % | ECE % |",
                  "|---|---|---|---|---|",
                  f"| the most likely letter | {options['questions']} | {options['accuracy']:.1f} | "
                  f"{options['mean_confidence']:.1f} | {options['ece']:.1f} |", "",
                  "The table above scores the answer's text as the release does (its letter, sampled). This one "
                  "takes the model's most likely option letter at the answer's first token and its probability "
                  "(a softmax over the option letters alone); the expected calibration error (ECE, 10 bins) says "
                  "how far that probability is from how often it is right. reliability.png draws it."]
    lines += ["", f"Outputs with no letter the release's pattern finds: {summary['no_letter']} "
              f"(counted wrong; the release's fallback for them crashes). Questions that could not be asked "
              f"(an unreadable image, too long for the context; each named in results.jsonl): {summary['errors']} "
              "(left out of every figure above)."]
    return "\n".join(lines) + "\n"


# --- comparing two runs ------------------------------------------------------------------


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b, c are the discordant pairs (right in A only, in B only)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # P(X <= k) for X ~ Binomial(n, 1/2), doubled; in log space so large n does not overflow
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k + 1)]
    m = max(logs)
    tail = math.exp(m) * sum(math.exp(x - m) for x in logs)
    return min(1.0, 2 * tail)


def compare(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Per model-card column and overall, on the questions both runs answered."""
    a = {r["number"]: r for r in rows_a}
    b = {r["number"]: r for r in rows_b}
    shared = sorted(set(a) & set(b))
    groups: dict[str, list[int]] = {}
    for n in shared:
        groups.setdefault(a[n]["column"], []).append(n)
    groups = {k: groups[k] for k in sorted(groups, key=_column_order)}
    groups["overall"] = shared
    out = {}
    for name, numbers in groups.items():
        ca = sum(bool(a[n]["correct"]) for n in numbers)
        cb = sum(bool(b[n]["correct"]) for n in numbers)
        only_a = sum(bool(a[n]["correct"]) and not b[n]["correct"] for n in numbers)
        only_b = sum(bool(b[n]["correct"]) and not a[n]["correct"] for n in numbers)
        total = len(numbers)
        out[name] = {"questions": total, "a": round(100 * ca / total, 2) if total else 0.0,
                     "b": round(100 * cb / total, 2) if total else 0.0,
                     "difference": round(100 * (cb - ca) / total, 2) if total else 0.0,
                     "only_a": only_a, "only_b": only_b, "p_value": mcnemar_p(only_a, only_b)}
    return {"shared": len(shared), "only_in_a": len(set(a) - set(b)), "only_in_b": len(set(b) - set(a)),
            "columns": out,
            "options": {"a": calibration.summary([a[n] for n in shared]),
                        "b": calibration.summary([b[n] for n in shared])}}


def compare_markdown(result: dict, name_a: str, name_b: str) -> str:
    lines = [f"| column | questions | A: {name_a} % | B: {name_b} % | B − A (points) | right only in A / only in B "
             "| McNemar p |", "|---|---|---|---|---|---|---|"]
    for col, d in result["columns"].items():
        sig = " *" if d["p_value"] < 0.05 else ""
        lines.append(f"| {col} | {d['questions']} | {d['a']:.1f} | {d['b']:.1f} | {d['difference']:+.1f} | "
                     f"{d['only_a']} / {d['only_b']} | {d['p_value']:.3g}{sig} |")
    opt = result.get("options") or {}
    if opt.get("a") and opt.get("b"):
        lines += ["", "| by the option letters' probabilities | questions | accuracy % | ECE % |", "|---|---|---|---|"]
        for name, key in ((f"A: {name_a}", "a"), (f"B: {name_b}", "b")):
            o = opt[key]
            lines.append(f"| {name} | {o['questions']} | {o['accuracy']:.1f} | {o['ece']:.1f} |")
    lines.append("")
    lines.append(f"Paired on the {result['shared']} questions both runs answered (exact McNemar test on the "
                 "questions one run got right and the other wrong; * p < 0.05)."
                 + (f" Left out: {result['only_in_a']} answered only in A, {result['only_in_b']} only in B."
                    if result["only_in_a"] or result["only_in_b"] else ""))
    return "\n".join(lines) + "\n"
