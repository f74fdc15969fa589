"""GPT-2 byte-level BPE's byte → printable-character table (Qwen2 uses it too)."""

from __future__ import annotations

from functools import cache

# The pre-tokenizer regex of Qwen2's tokenizer.json; llama.cpp's `qwen2` pre-type implements it.
QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """Each byte maps to a printable character; the vocabulary's token texts are made of these."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))
