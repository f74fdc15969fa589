"""Everything that touches llama.cpp: load the GGUF pair, tokenize, evaluate, encode images.

Tokenization follows the release's Hugging Face tokenizer rather than llama.cpp's
defaults (REFERENCE.md, 'llama.cpp formats'): text is NFC-normalized, the checkpoint's
added special tokens are matched exactly as HF does and nothing else is parsed as
special, no BOS is added, and pieces are detokenized with buffers sized to fit.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.gguf_check import check_gguf, read_fields
from PIL import Image

from .images import VisionInput

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type values
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class EngineError(HuatuoError):
    pass


def _llama():
    import llama_cpp

    return llama_cpp


def _mtmd():
    from llama_cpp import mtmd_cpp

    return mtmd_cpp


_LOG_CALLBACK = None
LAST_ERRORS: list[str] = []
GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


def quiet_logs() -> None:
    """Route llama.cpp's and libmtmd's logs away from the terminal; keep errors for messages.

    HUATUO_LOCAL_VERBOSE=1 shows everything, as llama.cpp's own tools would.
    """
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    llama_cpp = _llama()
    verbose = os.environ.get("HUATUO_LOCAL_VERBOSE") == "1"

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if verbose:
            os.write(2, text or b"")
        elif level == GGML_LOG_LEVEL_ERROR and text:
            LAST_ERRORS.append(text.decode("utf-8", "replace").strip())
            del LAST_ERRORS[:-20]

    _LOG_CALLBACK = log
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    _mtmd().mtmd_helper_log_set(log, ctypes.c_void_p(0))


DEFAULT_CTX = 8192


@dataclass
class EngineOptions:
    n_ctx: int = 0  # 0: DEFAULT_CTX
    n_batch: int = 2048
    # None: 256 on CPU, where it runs as fast as 512 and its compute buffer is ~80 MB smaller
    # (bench/settings.py, BENCHMARKS.md); 512 when offloading, where larger micro-batches pay.
    n_ubatch: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int = 0
    kv_type: str = "f16"
    flash_attn: bool = False
    mmproj_offload: bool = True
    seed: int = 0
    allow_unverified_vision: bool = False
    # None: off on CPU, where llama.cpp repacks the weights and a mapped file would keep them resident
    # twice (measured: 8.4 GiB vs the file's 4.4 GiB for the 7B at Q4_K_M); on when offloading.
    use_mmap: bool | None = None

    @property
    def threads(self) -> int:
        return self.n_threads or max(1, os.cpu_count() or 1)

    @property
    def ubatch(self) -> int:
        return self.n_ubatch or (256 if self.n_gpu_layers == 0 else 512)


_BUILD_ID: str | None = None


def engine_build_id() -> str:
    """A digest of the loaded llama.cpp libraries' bytes: another build may lay out KV state differently."""
    global _BUILD_ID
    if _BUILD_ID is None:
        llama_cpp = _llama()
        h = hashlib.sha256(f"llama-cpp-python {llama_cpp.__version__}".encode())
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        for lib in sorted(lib_dir.glob("*")) if lib_dir.is_dir() else []:
            if lib.is_file():
                h.update(lib.name.encode())
                h.update(lib.read_bytes())
        _BUILD_ID = h.hexdigest()
    return _BUILD_ID


def read_gguf_fields(path: Path, keys: tuple[str, ...], expect: str | None = None) -> dict:
    """A few metadata values of a GGUF file, after the bounded check (no tensor data is read)."""
    return read_fields(path, keys, expect)


class TextDecoder:
    """Streaming detokenizer with Hugging Face's decoding rules.

    Byte-level BPE (Qwen2): the bytes of all pieces, decoded as UTF-8 with replacement.
    SentencePiece byte fallback (Yi): a run of byte tokens that is not valid UTF-8 becomes
    one U+FFFD per token, as HF's ByteFallback decoder does, so a run is held until it ends.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.run: list[int] = []

    def _close_run(self) -> str:
        if not self.run:
            return ""
        data = b"".join(self.engine.token_bytes(t) for t in self.run)
        n, self.run = len(self.run), []
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * n

    def feed(self, token: int) -> str:
        if token in self.engine._byte_tokens:
            self.run.append(token)
            return ""
        return self._close_run() + self.utf8.decode(self.engine.token_bytes(token))

    def flush(self) -> str:
        return self._close_run() + self.utf8.decode(b"", final=True)


class Engine:
    """One loaded model: the LLM context (sequence 0) and the libmtmd vision context."""

    def __init__(self, llm_path: str | Path, mmproj_path: str | Path, options: EngineOptions | None = None,
                 eos_id: int | None = None):
        self.options = opts = options or EngineOptions()
        self.llm_path, self.mmproj_path = Path(llm_path), Path(mmproj_path)
        for p in (self.llm_path, self.mmproj_path):
            if not p.is_file():
                raise EngineError(f"{p}: no such model file")
        if opts.kv_type not in KV_TYPES:
            raise EngineError(f"--kv-type {opts.kv_type}: choose f16, f32 or q8_0")
        # Both files are checked (bounded header walk) before llama.cpp's parser sees them.
        check_gguf(self.llm_path, "llm")
        vision = check_gguf(self.mmproj_path, "mmproj").fields
        for key in ("clip.vision.image_size", "clip.vision.image_mean", "clip.vision.patch_size"):
            if key not in vision:
                raise EngineError(f"{self.mmproj_path}: vision projector without {key}; convert the model again")
        if not opts.n_ctx:
            # Room for the release's own limits (6 images of 576 positions and a 512-token answer
            # need 3968) plus a conversation's history; 4096 overflowed within them. Like the
            # release's `generate`, this does not stop at the model's training context.
            opts.n_ctx = DEFAULT_CTX
        self.vision = VisionInput(int(vision["clip.vision.image_size"]),
                                  tuple(float(x) for x in vision["clip.vision.image_mean"]))  # type: ignore[arg-type]
        # A LLaVA-1.5 image always takes (size / patch)^2 positions: 576 for CLIP ViT-L/14-336.
        self.image_tokens = (int(vision["clip.vision.image_size"]) // int(vision["clip.vision.patch_size"])) ** 2

        llama_cpp = _llama()
        from llama_cpp import Llama

        quiet_logs()
        LAST_ERRORS.clear()
        threads = opts.threads
        kv = KV_TYPES[opts.kv_type]
        try:
            self.llm = Llama(
                model_path=str(self.llm_path), n_ctx=opts.n_ctx, n_batch=opts.n_batch, n_ubatch=opts.ubatch,
                n_threads=threads, n_threads_batch=threads, n_gpu_layers=opts.n_gpu_layers, seed=opts.seed,
                type_k=kv, type_v=kv, flash_attn=opts.flash_attn, verbose=False,
                use_mmap=opts.use_mmap if opts.use_mmap is not None else opts.n_gpu_layers != 0,
            )
        except ValueError as exc:
            detail = next((e for e in LAST_ERRORS if "error loading model" in e), None) or str(exc)
            raise EngineError(f"{self.llm_path}: llama.cpp could not load the model ({detail})") from exc
        self.ctx = self.llm.ctx
        self.model = self.llm.model
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        proj_dim = int(vision.get("clip.vision.projection_dim", self.n_embd))
        if proj_dim != self.n_embd:
            raise EngineError(
                f"{self.mmproj_path}: this vision projector makes {proj_dim}-wide embeddings but the language "
                f"model expects {self.n_embd}; use the mmproj converted with this model"
            )
        self.eos_id = int(eos_id if eos_id is not None else llama_cpp.llama_vocab_eos(self.vocab))
        self._specials, self._byte_tokens = self._scan_vocab()
        self._special_re = (
            re.compile("|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True)))
            if self._specials else None
        )

        mtmd = _mtmd()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = bool(opts.mmproj_offload and opts.n_gpu_layers != 0)
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        self.mtmd_ctx = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self.model, params)
        if not self.mtmd_ctx:
            raise EngineError(f"{self.mmproj_path}: libmtmd could not load the vision projector")
        self.marker = mtmd.mtmd_default_marker().decode()
        self.vision_warning: str | None = None
        self._vision_checked = False
        self.n_past = 0
        self._batch = llama_cpp.llama_batch_init(opts.n_batch, 0, 1)

    # --- tokens -----------------------------------------------------------------------

    def _scan_vocab(self) -> tuple[dict[str, int], frozenset[int]]:
        """Added tokens HF matches verbatim in text (control tokens), and byte-fallback tokens."""
        llama_cpp = _llama()
        specials: dict[str, int] = {}
        byte_tokens = set()
        for tid in range(self.n_vocab):
            attr = llama_cpp.llama_vocab_get_attr(self.vocab, tid)
            if attr & (1 << 5):  # LLAMA_TOKEN_ATTR_BYTE
                byte_tokens.add(tid)
            # LLAMA_TOKEN_ATTR_CONTROL; llama.cpp also flags `</s>`-like texts it puts on its own
            # end-of-generation list, which are plain text to the release's tokenizer.
            if attr & (1 << 3):
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
                ids.append(self._specials[m.group(0)])
                pos = m.end()
        ids += self._tokenize_plain(text[pos:])
        return ids

    def _tokenize_plain(self, text: str) -> list[int]:
        if not text:
            return []
        llama_cpp = _llama()
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
        llama_cpp = _llama()
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
        return TextDecoder(self)

    # --- evaluation -------------------------------------------------------------------

    def eval_tokens(self, tokens: list[int], logits_last: bool = True) -> None:
        """Append tokens at n_past; the logits of the last one are kept."""
        llama_cpp = _llama()
        step = self.options.n_batch
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            self._check_room(len(chunk))
            b = self._batch
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = self.n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = bool(logits_last and start + i == len(tokens) - 1)
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                raise EngineError(f"llama_decode failed ({rc}); the context may be full, raise --ctx")
            self.n_past += len(chunk)

    def _check_room(self, n: int) -> None:
        if self.n_past + n > self.options.n_ctx:
            raise EngineError(
                f"the conversation needs {self.n_past + n} tokens but the context holds {self.options.n_ctx}; "
                "raise --ctx or /clear the history"
            )

    def _image_chunks(self, image: Image.Image):
        """libmtmd chunks for one prepared image (already padded and resized)."""
        mtmd = _mtmd()
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        h, w = rgb.shape[:2]
        bitmap = mtmd.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text()
        marker = self.marker.encode()
        text.text = marker
        text.text_len = len(marker)
        text.add_special = False
        text.parse_special = False
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mtmd.mtmd_tokenize(self.mtmd_ctx, chunks, ctypes.byref(text), bitmaps, 1)
        mtmd.mtmd_bitmap_free(bitmap)
        if rc != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise EngineError(f"libmtmd could not tokenize the image ({rc})")
        return chunks

    def verify_vision(self) -> None:
        """Refuse to encode images with a libmtmd that fails the probe (once per library)."""
        if self._vision_checked:
            return
        from .probe import FIX_HINT, check_library

        result = check_library()
        if not result.ok:
            message = (f"{result.library}: this llama.cpp build encodes LLaVA images wrongly ({result.verdict}: "
                       f"{result.detail or 'see huatuo-local doctor'}); {FIX_HINT}")
            if not self.options.allow_unverified_vision:
                raise EngineError(message + ", or pass --allow-unverified-vision to answer anyway")
            self.vision_warning = "warning: image encoding is unverified; " + message
        self._vision_checked = True

    def eval_image(self, image: Image.Image) -> int:
        """Encode one prepared image and append its embeddings; returns its token count."""
        self.verify_vision()
        mtmd = _mtmd()
        chunks = self._image_chunks(image)
        try:
            added = 0
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if mtmd.mtmd_input_chunk_get_type(chunk) == 0:  # text
                    if n:
                        raise EngineError("libmtmd added text around the image; this projector is not LLaVA-style")
                    continue
                self._check_room(n)
                new_past = _llama().llama_pos(0)
                rc = mtmd.mtmd_helper_eval_chunk_single(self.mtmd_ctx, self.ctx, chunk, self.n_past, 0,
                                                        self.options.n_batch, True, ctypes.byref(new_past))
                if rc != 0:
                    raise EngineError(f"libmtmd failed to encode or decode the image ({rc})")
                added += new_past.value - self.n_past
                self.n_past = new_past.value
            if added != self.image_tokens:
                raise EngineError(f"libmtmd gave {added} positions for an image, expected {self.image_tokens}")
            return added
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """The projector's output for one prepared image, (n_tokens, n_embd)."""
        mtmd = _mtmd()
        chunks = self._image_chunks(image)
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == 0:
                    continue
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if mtmd.mtmd_encode_chunk(self.mtmd_ctx, chunk) != 0:
                    raise EngineError("libmtmd failed to encode the image")
                ptr = mtmd.mtmd_get_output_embd(self.mtmd_ctx)
                return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
            raise EngineError("libmtmd produced no image chunk")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def logits(self) -> np.ndarray:
        """Logits of the last evaluated position (a copy)."""
        llama_cpp = _llama()
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def truncate(self, n_past: int) -> None:
        """Forget everything from position n_past on (KV cache and counter)."""
        llama_cpp = _llama()
        mem = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_seq_rm(mem, 0, n_past, -1)
        self.n_past = n_past

    def sequence_state(self) -> bytes:
        """The KV state of sequence 0 (positions 0..n_past), as llama.cpp serializes it."""
        llama_cpp = _llama()
        size = llama_cpp.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, 0)
        if written != size:
            raise EngineError(f"llama.cpp wrote {written} of {size} state bytes")
        return bytes(buf)

    def restore_sequence_state(self, data: bytes) -> int:
        """Replace sequence 0 with a saved state; returns the positions restored, 0 on failure.

        On failure the sequence is left empty (n_past 0), never half-restored.
        """
        llama_cpp = _llama()
        self.truncate(0)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), 0) != len(data):
            self.truncate(0)
            return 0
        mem = llama_cpp.llama_get_memory(self.ctx)
        lo, hi = llama_cpp.llama_memory_seq_pos_min(mem, 0), llama_cpp.llama_memory_seq_pos_max(mem, 0)
        if lo != 0 or hi < 0 or hi + 1 > self.options.n_ctx:
            self.truncate(0)
            return 0
        self.n_past = int(hi) + 1
        return self.n_past

    def __del__(self) -> None:
        # A discarded HuatuoChatbot must give its memory back (the CLIP weights live in libmtmd,
        # outside Python's accounting) even when nobody called close().
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        if getattr(self, "mtmd_ctx", None):
            _mtmd().mtmd_free(self.mtmd_ctx)
            self.mtmd_ctx = None
        if getattr(self, "_batch", None) is not None:
            _llama().llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
