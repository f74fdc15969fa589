"""Text to token ids and back, as the release's Hugging Face tokenizer does it, over llama.cpp's vocabulary.

Not llama.cpp's own special-token parsing: the release's added special tokens (`<|im_end|>` ...) are matched
exactly as HF matches them, nothing else is parsed as special, no BOS is added, and pieces are read with
buffers sized to fit (llama-cpp-python's 32 bytes cut long pieces).
"""

from __future__ import annotations

import ctypes
import re
import threading
import unicodedata

from huatuo_local.runtime.engine.text import TextDecoder
from huatuo_local.runtime.llama import constants as C
from huatuo_local.runtime.llama.bindings import llama


class Tokenizer:
    """The tokenizer of one loaded model (`vocab`: its llama_vocab pointer, alive as long as the model)."""

    def __init__(self, vocab) -> None:
        self.vocab = vocab
        self.n_vocab = llama().llama_vocab_n_tokens(vocab)
        self._lock = threading.Lock()
        self._scanned: tuple | None = None

    def warm(self) -> None:
        """Scan the vocabulary now (a fifth of a second for 152k tokens): the engine does it on a thread while
        the context is created; anything that needs the result waits for it."""
        with self._lock:
            if self._scanned is None:
                specials, byte_tokens = self._scan()
                pattern = (re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
                           if specials else None)
                self._scanned = (specials, byte_tokens, pattern)

    @property
    def specials(self) -> dict[str, int]:
        self.warm()
        assert self._scanned is not None
        return self._scanned[0]

    @property
    def byte_tokens(self) -> frozenset[int]:
        self.warm()
        assert self._scanned is not None
        return self._scanned[1]

    @property
    def _special_re(self):
        self.warm()
        assert self._scanned is not None
        return self._scanned[2]

    def _scan(self) -> tuple[dict[str, int], frozenset[int]]:
        """Added tokens HF matches verbatim in text (control tokens), and byte-fallback tokens."""
        llama_cpp = llama()
        specials: dict[str, int] = {}
        byte_tokens = set()
        for tid in range(self.n_vocab):
            attr = llama_cpp.llama_vocab_get_attr(self.vocab, tid)
            if attr & C.LLAMA_TOKEN_ATTR_BYTE:
                byte_tokens.add(tid)
            # LLAMA_TOKEN_ATTR_CONTROL; llama.cpp also flags `</s>`-like texts it puts on its own
            # end-of-generation list, which are plain text to the release's tokenizer.
            if attr & C.LLAMA_TOKEN_ATTR_CONTROL:
                piece = self.token_bytes(tid, special=True).decode("utf-8", "replace")
                if piece and piece.startswith("<") and piece.endswith(">") and piece != "</s>":
                    specials[piece] = tid
        return specials, frozenset(byte_tokens)

    def tokenize(self, text: str) -> list[int]:
        """Token ids as the release's tokenizer gives them (add_special_tokens=False)."""
        text = unicodedata.normalize("NFC", text)
        if not text:
            return []
        ids: list[int] = []
        pos = 0
        if self._special_re is not None:
            for m in self._special_re.finditer(text):
                ids += self._tokenize_plain(text[pos:m.start()])
                ids.append(self.specials[m.group(0)])
                pos = m.end()
        ids += self._tokenize_plain(text[pos:])
        return ids

    def _tokenize_plain(self, text: str) -> list[int]:
        if not text:
            return []
        llama_cpp = llama()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, False, False)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, False, False)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """One token's bytes; the buffer grows to the piece's size (llama-cpp-python uses 32)."""
        llama_cpp = llama()
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def detokenize(self, tokens: list[int]) -> str:
        """Decode with special tokens skipped, as the release's `skip_special_tokens=True`."""
        decoder = self.text_decoder()
        return "".join(decoder.feed(t) for t in tokens) + decoder.flush()

    def text_decoder(self) -> TextDecoder:
        """A streaming decoder: one token in, the text it completes out."""
        return TextDecoder(self.token_bytes, self.byte_tokens)
