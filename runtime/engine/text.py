"""Token ids back to text, as the release's Hugging Face tokenizer decodes them."""

from __future__ import annotations

import codecs
from collections.abc import Callable


class TextDecoder:
    """Streaming detokenizer with Hugging Face's decoding rules.

    Byte-level BPE (Qwen2): the bytes of all pieces, decoded as UTF-8 with replacement.
    SentencePiece byte fallback (Yi): a run of byte tokens that is not valid UTF-8 becomes
    one U+FFFD per token, as HF's ByteFallback decoder does, so a run is held until it ends.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], byte_tokens: frozenset[int]):
        self.token_bytes, self.byte_tokens = token_bytes, byte_tokens
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.run: list[int] = []

    def _close_run(self) -> str:
        if not self.run:
            return ""
        data = b"".join(self.token_bytes(t) for t in self.run)
        n, self.run = len(self.run), []
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * n

    def feed(self, token: int) -> str:
        if token in self.byte_tokens:
            self.run.append(token)
            return ""
        return self._close_run() + self.utf8.decode(self.token_bytes(token))

    def flush(self) -> str:
        return self._close_run() + self.utf8.decode(b"", final=True)
