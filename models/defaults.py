"""The release's generation settings (docs/RELEASE.md, 'Generation')."""

from __future__ import annotations

TEMPERATURE = 0.2
REPETITION_PENALTY = 1.2  # applied to generated tokens only, never the prompt
MAX_NEW_TOKENS = 512
MIN_NEW_TOKENS = 1
TOP_K = 50
TOP_P = 1.0
