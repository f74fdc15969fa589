"""Tokenizer files → the GGUF tokenizer: byte-level BPE (Qwen2) or SentencePiece (Yi).

Read straight from the checkpoint's files (tokenizer.json / vocab.json + merges.txt, or
tokenizer.model), with no tokenizer library: the SentencePiece model is a small protobuf
that is parsed here field by field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import TokenType
from huatuo_local.models.bytelevel import QWEN2_PRETOKENIZER_REGEX
from huatuo_local.models.errors import CheckpointError, UnsupportedModelError
from huatuo_local.models.jsonfile import read_json


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_space_prefix: bool = False
    padded: int = 0  # rows added to match the embedding matrix
    specials: dict[str, int] = field(default_factory=dict)


def _load_json(path: Path) -> Any:
    return read_json(path)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_tokens(folder: Path, tok_json: dict | None) -> list[dict]:
    """Added tokens with id, content, special, from tokenizer.json or tokenizer_config.json."""
    if tok_json and tok_json.get("added_tokens"):
        return [dict(t) for t in tok_json["added_tokens"]]
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        decoder = _load_json(cfg_path).get("added_tokens_decoder") or {}
        return [{"id": int(i), "content": t["content"], "special": t.get("special", True)} for i, t in decoder.items()]
    return []


def _pad(tokens: list[str], types: list[int], scores: list[float] | None, n_vocab: int, where: Path) -> int:
    if len(tokens) > n_vocab:
        raise CheckpointError(
            f"{where}: the tokenizer has {len(tokens)} tokens but the embedding matrix only {n_vocab} rows"
        )
    extra = n_vocab - len(tokens)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    return extra


def _special_ids(folder: Path, lookup: dict[str, int], model_cfg: dict) -> dict[str, int | None]:
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = _load_json(tcfg_path) if tcfg_path.is_file() else {}
    smap_path = folder / "special_tokens_map.json"
    smap = _load_json(smap_path) if smap_path.is_file() else {}
    ids: dict[str, int | None] = {}
    for kind in ("bos", "eos", "pad", "unk"):
        text = _token_text(tcfg.get(f"{kind}_token")) or _token_text(smap.get(f"{kind}_token"))
        if text is not None and text not in lookup:
            raise CheckpointError(f"{tcfg_path}: {kind}_token {text!r} is not in the vocabulary")
        ids[kind] = lookup[text] if text is not None else None
    if ids["eos"] is None:
        eos = model_cfg.get("eos_token_id")
        ids["eos"] = eos[0] if isinstance(eos, list) else eos
    if ids["eos"] is None:
        raise CheckpointError(f"{folder}: no eos token in tokenizer_config.json or config.json")
    return ids


def bpe_vocab(folder: Path, n_vocab: int, model_cfg: dict) -> Vocab:
    folder = Path(folder)
    tok_path = folder / "tokenizer.json"
    tok_json = _load_json(tok_path) if tok_path.is_file() else None
    if tok_json is not None:
        model = tok_json.get("model") or {}
        if model.get("type") != "BPE":
            raise UnsupportedModelError(f"{tok_path}: expected a BPE tokenizer, found {model.get('type')}")
        vocab: dict[str, int] = model["vocab"]
        merges_raw = model.get("merges") or []
        _check_qwen2_pretokenizer(tok_json, tok_path)
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _load_json(folder / "vocab.json")
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges_raw = [ln for ln in lines if ln and not ln.startswith("#version")]
    else:
        raise CheckpointError(f"{folder}: no tokenizer (tokenizer.json, or vocab.json with merges.txt)")
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges_raw]

    added = _added_tokens(folder, tok_json)
    lookup = dict(vocab)
    for t in added:
        lookup[t["content"]] = int(t["id"])
    bad = [(k, v) for k, v in lookup.items() if not isinstance(k, str) or not isinstance(v, int)
           or isinstance(v, bool) or not 0 <= v < n_vocab]
    if bad or not lookup:
        # Ids index the embedding matrix; one of 10**9 would also make this list 10**9 long.
        raise CheckpointError(f"{tok_path if tok_json is not None else folder / 'vocab.json'}: token "
                              f"{bad[0] if bad else '(none)'} is not an id below the {n_vocab} embedding rows")
    size = max(lookup.values()) + 1
    tokens: list[str | None] = [None] * size
    types = [TokenType.NORMAL] * size
    for text, i in vocab.items():
        tokens[i] = text
    for t in added:
        i = int(t["id"])
        tokens[i] = t["content"]
        types[i] = TokenType.CONTROL if t.get("special", False) else TokenType.USER_DEFINED
    holes = [i for i, t in enumerate(tokens) if t is None]
    for i in holes:
        tokens[i] = f"[PAD{i}]"
        types[i] = TokenType.UNUSED
    final = [t for t in tokens if t is not None]
    padded = _pad(final, types, None, n_vocab, folder)
    ids = _special_ids(folder, lookup, model_cfg)
    eos = int(ids["eos"])
    # llama.cpp falls back to token 11 when no bos is written; Qwen2 has none, so name eos.
    return Vocab(
        model="gpt2", pre="qwen2", tokens=final, types=types, merges=merges,
        bos_id=ids["bos"] if ids["bos"] is not None else eos, eos_id=eos,
        pad_id=ids["pad"] if ids["pad"] is not None else eos, unk_id=None, padded=padded,
        specials={t["content"]: int(t["id"]) for t in added if t.get("special", False)},
    )


def _check_qwen2_pretokenizer(tok_json: dict, where: Path) -> None:
    """llama.cpp hard-codes the Qwen2 regex for pre-type `qwen2`; refuse anything else."""
    patterns: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            pat = node.get("pattern")
            if isinstance(pat, dict) and "Regex" in pat:
                patterns.append(pat["Regex"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tok_json.get("pre_tokenizer"))
    if patterns and QWEN2_PRETOKENIZER_REGEX not in patterns:
        raise UnsupportedModelError(
            f"{where}: the pre-tokenizer is not Qwen2's; llama.cpp would split text differently"
        )


# --- SentencePiece --------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
        yield num, wire, val


def read_sentencepiece(path: Path) -> tuple[list[str], list[float], list[int], bool]:
    """Pieces, scores, types and add_dummy_prefix of a SentencePiece tokenizer.model."""
    try:
        data = Path(path).read_bytes()
        pieces, scores, types = [], [], []
        add_prefix = True
        for num, _, val in _fields(data):
            if num == 1:  # SentencePiece {piece=1, score=2, type=3}
                piece, score, kind = "", 0.0, 1
                for n2, _, v2 in _fields(val):
                    if n2 == 1:
                        piece = v2.decode("utf-8")
                    elif n2 == 2:
                        score = struct.unpack("<f", v2)[0]
                    elif n2 == 3:
                        kind = v2
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif num == 3:  # NormalizerSpec {add_dummy_prefix=3}
                for n2, _, v2 in _fields(val):
                    if n2 == 3:
                        add_prefix = bool(v2)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable SentencePiece model ({exc}); download it again") from exc
    if not pieces:
        raise CheckpointError(f"{path}: no pieces; not a SentencePiece model")
    return pieces, scores, types, add_prefix


def spm_vocab(folder: Path, n_vocab: int, model_cfg: dict) -> Vocab:
    folder = Path(folder)
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the SentencePiece tokenizer is needed for this model")
    pieces, scores, types, add_prefix = read_sentencepiece(path)
    # SentencePiece types (NORMAL=1 … BYTE=6) are the same numbers as gguf's TokenType.
    lookup = {p: i for i, p in enumerate(pieces)}
    for t in _added_tokens(folder, None):
        i, text = int(t["id"]), t["content"]
        if i < len(pieces):
            if pieces[i] != text:
                raise CheckpointError(f"{folder}: added token {i} {text!r} disagrees with tokenizer.model")
        else:
            while len(pieces) < i:
                pieces.append(f"[PAD{len(pieces)}]")
                scores.append(-1000.0)
                types.append(TokenType.UNUSED)
            pieces.append(text)
            scores.append(0.0)
            types.append(TokenType.USER_DEFINED)
        if t.get("special", False):
            types[i] = TokenType.CONTROL
        lookup[text] = i
    padded = _pad(pieces, types, scores, n_vocab, folder)
    ids = _special_ids(folder, lookup, model_cfg)
    unk = ids["unk"] if ids["unk"] is not None else next(
        (i for i, t in enumerate(types) if t == TokenType.UNKNOWN), None)
    bos = ids["bos"] if ids["bos"] is not None else model_cfg.get("bos_token_id", ids["eos"])
    return Vocab(
        model="llama", pre="default", tokens=pieces, types=types, scores=scores,
        bos_id=bos, eos_id=int(ids["eos"]), pad_id=ids["pad"], unk_id=unk,
        add_space_prefix=add_prefix, padded=padded,
        specials={p: i for i, p in enumerate(pieces) if types[i] == TokenType.CONTROL},
    )


def read_vocab(folder: Path, arch: str, n_vocab: int, model_cfg: dict) -> Vocab:
    """The checkpoint's tokenizer, for a `qwen2` (BPE) or `llama` (SentencePiece) LLM."""
    try:
        if arch == "qwen2":
            return bpe_vocab(folder, n_vocab, model_cfg)
        if (Path(folder) / "tokenizer.model").is_file():
            return spm_vocab(folder, n_vocab, model_cfg)
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
        # Tokenizer files are nested JSON (or protobuf) of a fixed shape; any other shape is a
        # damaged or hostile file, whichever field it trips on.
        raise CheckpointError(f"{folder}: malformed tokenizer files ({type(exc).__name__}: {exc}); "
                              "download the tokenizer again") from exc
    raise CheckpointError(f"{folder}: tokenizer.model missing; the Yi/Llama backbone needs its SentencePiece model")
