"""Structured answers: a JSON schema (or any JSON object) enforced while the answer is sampled.

The constraint engine is llguidance (the library llama.cpp itself can use for JSON schemas): it compiles the
schema to a grammar once per request, and for each token gives the set of tokens that keep the answer valid.
That set is applied as a mask on the model's scores before the release's sampling (repetition penalty,
temperature, top-k, top-p run unchanged on what is left), so an answer is always a prefix of a valid document,
and ends when the document is complete. Without a schema nothing here runs and sampling is exactly the
release's. Why not llama-cpp-python's JSON-schema-to-GBNF converter: tried on a tiny model, it let through
integers outside `minimum`/`maximum` and raw control characters inside strings.

JSON is written compactly (no free whitespace): a model cannot spend its token budget on spaces, and what it
writes parses with `json.loads` as soon as it is complete.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass

import numpy as np
from huatuo_local.models.errors import HuatuoError

# How JSON is written: compact separators, no whitespace between tokens (see the module).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
MAX_SCHEMA_BYTES = 64 * 1024


class SchemaError(HuatuoError):
    """A schema the constraint engine cannot express, or one that is not a schema; the message names it."""


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint, shared by every answer that uses it (immutable)."""

    text: str  # llguidance's grammar
    kind: str  # "json_schema" or "json_object"

    @classmethod
    def json_schema(cls, schema: object) -> Grammar:
        """The grammar of documents valid against `schema` (a JSON Schema as a dict); SchemaError when it is
        not one, or uses what cannot be enforced (the message names the construct)."""
        if not isinstance(schema, dict):
            raise SchemaError("the schema must be a JSON object")
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_BYTES:
            raise SchemaError(f"the schema is {len(text)} bytes; at most {MAX_SCHEMA_BYTES}")
        return cls(_compile(schema), "json_schema")

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's `{"type": "json_object"}`)."""
        return cls(_compile({"type": "object"}), "json_object")


def _compile(schema: dict) -> str:
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"not a JSON schema ({exc})") from None
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise SchemaError(f"the schema cannot be enforced: {_first_line(messages[0])}")
    return grammar


def _first_line(message: str) -> str:
    """llguidance's message on one line: its lines joined, the caret art left out (a regex error says the
    construct on its last line: "look-around, including look-ahead and look-behind, is not supported")."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip() and set(ln.strip()) != {"^"}]
    return " ".join(lines)[:400] or "unknown reason"


# One llguidance tokenizer per loaded model's tokenizer: building it reads the whole vocabulary (~0.5 s for
# Qwen2's 152,064 tokens), so it is made on the first constrained answer and kept with the model.
_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


class _Vocabulary:
    """The model's vocabulary as llguidance's TokenizerWrapper reads it: every token's bytes, control tokens
    marked with a leading 0xFF (so that no grammar can produce them), and our own HF-identical tokenize."""

    def __init__(self, tokenizer, eos_id: int):
        self.eos_token_id = eos_id
        self.bos_token_id = None
        self.special_token_ids = sorted(set(tokenizer.specials.values()))
        special = set(self.special_token_ids)
        self.tokens = [b"\xff" + tokenizer.token_bytes(t, special=True) if t in special else tokenizer.token_bytes(t)
                       for t in range(tokenizer.n_vocab)]
        self._tokenize = tokenizer.tokenize

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # llguidance probes whether bytes are accepted: they are not
            raise TypeError("text only")
        return self._tokenize(text)


def ll_tokenizer(tokenizer, eos_id: int):
    """llguidance's tokenizer for this model (engine/tokenizer.py's Tokenizer), built once."""
    from llguidance import LLTokenizer, TokenizerWrapper

    with _LL_LOCK:
        found = _LL_TOKENIZERS.get(tokenizer)
        if found is None:
            found = LLTokenizer(TokenizerWrapper(_Vocabulary(tokenizer, eos_id)), eos_token=eos_id)
            _LL_TOKENIZERS[tokenizer] = found
        return found


class Constraint:
    """One answer's state in a grammar: which tokens may come next, and whether the document is complete."""

    def __init__(self, grammar: Grammar, tokenizer, eos_id: int):
        from llguidance import LLMatcher

        self.eos_id = eos_id
        self._ll = ll_tokenizer(tokenizer, eos_id)
        self._matcher = LLMatcher(self._ll, grammar.text, log_level=0)
        if self._matcher.is_error():
            raise SchemaError(f"the schema cannot be enforced: {_first_line(self._matcher.get_error())}")
        self._words = np.zeros((self._ll.vocab_size + 31) // 32, dtype=np.int32)

    @property
    def complete(self) -> bool:
        """The document is complete and nothing may follow it: the answer ends here."""
        return self._matcher.is_stopped()

    def mask(self, logits: np.ndarray) -> None:
        """Set the scores of tokens the grammar does not allow next to -inf, in place."""
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: logits.size].astype(bool)
        logits[~allowed] = -np.inf

    def accept(self, token: int) -> bool:
        """The token sampled; False when the grammar does not allow it (the mask left only the end, which
        --min-tokens forbade: the answer ends)."""
        return bool(self._matcher.consume_token(token))
