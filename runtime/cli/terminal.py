"""Text from the model, made safe to show on a terminal.

An answer is text the model generated, and a model can generate any character: a carriage return
would overwrite what the terminal shows, an escape sequence would move the cursor, change colours or
retitle the window. What the terminal shows must be what a transcript saves, so control characters
are shown as Unicode's control pictures (U+2400 block: ␍ for a carriage return, ␛ for escape) instead
of being executed; newlines and tabs stay as they are.
"""

from __future__ import annotations

# C0 controls but \t and \n, DEL, and the C1 controls (U+0080-U+009F, which some terminals obey too).
_SHOWN = {c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A)}
_SHOWN[0x7F] = 0x2421
_SHOWN.update({c: 0xFFFD for c in range(0x80, 0xA0)})


def shown(text: str) -> str:
    """`text` with every control character but newline and tab replaced by a visible picture of it."""
    return text.translate(_SHOWN)
