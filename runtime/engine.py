"""Everything that touches llama.cpp: load the GGUF pair, tokenize, evaluate, encode images.

Tokenization follows the release's Hugging Face tokenizer rather than llama.cpp's
defaults (docs/RELEASE.md, 'llama.cpp facts'): text is NFC-normalized, the checkpoint's
added special tokens are matched exactly as HF does and nothing else is parsed as
special, no BOS is added, and pieces are detokenized with buffers sized to fit.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import mmap
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.gguf_check import check_gguf
from PIL import Image

from . import llama_constants as C
from .images import VisionInput

KV_TYPES = {"f32": C.GGML_TYPE_F32, "f16": C.GGML_TYPE_F16, "q8_0": C.GGML_TYPE_Q8_0}


class EngineError(HuatuoError):
    pass


class DecodeAborted(EngineError):
    """llama_decode stopped because the abort check said so; what it did is still in the KV cache."""


def _llama():
    import llama_cpp

    return llama_cpp


def _mtmd():
    from llama_cpp import mtmd_cpp

    return mtmd_cpp


_LOG_CALLBACK = None
LAST_ERRORS: list[str] = []


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
        elif level == C.GGML_LOG_LEVEL_ERROR and text:
            LAST_ERRORS.append(text.decode("utf-8", "replace").strip())
            del LAST_ERRORS[:-20]

    _LOG_CALLBACK = log
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    _mtmd().mtmd_helper_log_set(log, ctypes.c_void_p(0))


DEFAULT_CTX = 8192


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores, the thread count llama.cpp's own tools default to: with SMT, a second thread on a
    core competes for the same vector units and these kernels slow down (bench/settings.py measures it)."""
    try:
        cores, block = set(), {}
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
        for line in text.splitlines() + [""]:
            if not line.strip():
                if "core id" in block:
                    cores.add((block.get("physical id", "0"), block["core id"]))
                block = {}
            elif ":" in line:
                key, _, value = line.partition(":")
                block[key.strip()] = value.strip()
        if cores:
            return len(cores)
    except OSError:
        pass
    return max(1, os.cpu_count() or 1)


# llama.cpp's load modes (llama.h `enum llama_load_mode`), by the name `--load` takes.
LOAD_MODES = {"read": C.LLAMA_LOAD_MODE_NONE, "mmap": C.LLAMA_LOAD_MODE_MMAP, "mmap-release": C.LLAMA_LOAD_MODE_MMAP}
_MADV_DONTNEED = 4


def _rss_anon() -> int:
    """This process's resident anonymous memory in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class MappedPages:
    """Drops the resident pages of llama.cpp's read-only mapping of a GGUF while and after it loads.

    Why: on CPU llama.cpp repacks most quantized weights (Q4_K, Q4_0 ...) into its own buffers, copying
    them out of the mapped file, yet the mapped pages it read stay resident: the weights in memory
    twice. Reading the file instead ("read") avoids that but costs the kernel time of faulting every
    page of an anonymous buffer. Mapping and dropping the pages already read keeps the mapping's speed
    and the read path's footprint. Dropping pages of a shared read-only file mapping is always safe:
    a tensor still used from the mapping (the token embeddings, norms) is faulted back in from the page
    cache the next time it is read. Pages are dropped only while loading copies most of what it reads
    (anonymous memory grows with the data loaded): a model whose weights are used in place (F16 on
    most CPUs) keeps its mapping as it is. Linux only; elsewhere a no-op.
    """

    STEP = 64 << 20  # drop in steps of this many bytes of loaded data (each step reads /proc/self/status)

    def __init__(self, path: Path):
        self.path = os.path.realpath(path)
        self.size = os.path.getsize(path)
        self.dropped = 0  # file offset below which pages were dropped once
        self.anon0 = _rss_anon()
        self._maps: list[tuple[int, int, int]] | None = None
        try:
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            self._madvise = None

    def _ranges(self) -> list[tuple[int, int, int]]:
        """(start, end, file offset) of this file's mappings in this process."""
        out = []
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].rstrip("\n") == self.path:
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        out.append((start, end, int(parts[2], 16)))
        except OSError:
            pass
        return out

    def _drop(self, first: int, last: int, maps: list[tuple[int, int, int]]) -> None:
        """Drop the pages of file bytes [first, last) wherever they are mapped."""
        if self._madvise is None:
            return
        page = mmap.PAGESIZE
        for start, end, offset in maps:
            lo = max(start, start + first - offset)
            hi = min(end, start + last - offset)
            lo += -(lo - start) % page
            hi -= (hi - start) % page
            if hi > lo:
                self._madvise(lo, hi - lo, _MADV_DONTNEED)

    def progress(self, fraction: float, _user: object) -> bool:
        # Called by llama.cpp between tensors. They load roughly in file order (per buffer type):
        # a tenth of the file is kept as a margin behind the loader, and everything behind it is
        # dropped again at each step (pages read twice come back). Only once the load is seen
        # copying (anonymous memory growing past what loading allocates for itself).
        upto = int((fraction - 0.1) * self.size)
        if upto - self.dropped >= self.STEP and _rss_anon() - self.anon0 > max(256 << 20, self.size // 20):
            if self._maps is None:
                self._maps = self._ranges()
            self._drop(0, upto, self._maps)
            self.dropped = upto
        return True

    def release_all(self) -> None:
        """After loading: drop every mapped page if the load copied the weights out of the mapping."""
        if self.dropped or _rss_anon() - self.anon0 > self.size // 2:
            self._drop(0, self.size, self._ranges())  # llama.cpp unmapped parts at the end: read the maps again


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
    n_seq: int = 1  # parallel sequences (server slots), each with n_ctx positions
    allow_unverified_vision: bool = False
    # How the weights reach memory (LOAD_MODES). None: "mmap-release" on CPU, "mmap" when offloading.
    load: str | None = None
    # llama.cpp RPC workers (HOST:PORT) that hold some of the layers (runtime/rpc.py); the vision
    # encoder stays here. tensor_split: this machine's share first, then each worker's (None: by
    # free memory).
    rpc: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] | None = None
    rpc_output_local: bool = True  # the LM head's weights stay here: hidden states, not logits, cross the wire

    @property
    def threads(self) -> int:
        return self.n_threads or physical_cores()

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
    """One loaded model: the LLM context with `n_seq` sequences and the libmtmd vision context.

    Only primitive operations live here; which sequence runs what, and when, is decided by
    runtime/scheduler.py.
    """

    def __init__(self, llm_path: str | Path, mmproj_path: str | Path, options: EngineOptions | None = None,
                 eos_id: int | None = None):
        self.options = opts = options or EngineOptions()
        self.placement_note = ""  # where the model went, when a GPU decided it (api.open_model sets it)
        self.llm_path, self.mmproj_path = Path(llm_path), Path(mmproj_path)
        for p in (self.llm_path, self.mmproj_path):
            if not p.is_file():
                raise EngineError(f"{p}: no such model file")
        if opts.kv_type not in KV_TYPES:
            raise EngineError(f"--kv-type {opts.kv_type}: choose f16, f32 or q8_0")
        # Both files are checked (bounded header walk) before llama.cpp's parser sees them.
        llm_fields = check_gguf(self.llm_path, "llm").fields
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
        quiet_logs()
        LAST_ERRORS.clear()
        threads = opts.threads
        kv = KV_TYPES[opts.kv_type]
        self.n_seq = max(1, opts.n_seq)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        self.rpc_layers = 0
        if opts.rpc:
            self.rpc_layers = self._place_on_workers(opts, llm_fields, mparams)
        from . import rpc

        self._devices = rpc.device_list(opts.rpc)  # None unless RPC workers were registered in this process
        if self._devices is not None:
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        load = opts.load or ("mmap-release" if opts.n_gpu_layers == 0 else "mmap")
        if load not in LOAD_MODES:
            raise EngineError(f"unknown load mode {load!r}; use one of {', '.join(LOAD_MODES)}")
        # (llama-cpp-python's struct has `load_mode`; a `use_mmap` attribute would be silently ignored)
        mparams.load_mode = LOAD_MODES[load]
        release = MappedPages(self.llm_path) if load == "mmap-release" else None
        if release is not None:
            # Called by llama.cpp between tensors as loading proceeds (one thread; see MappedPages).
            self._load_progress = llama_cpp.llama_progress_callback(release.progress)
            mparams.progress_callback = self._load_progress
        self.model = llama_cpp.llama_model_load_from_file(str(self.llm_path).encode(), mparams)
        if release is not None:
            release.release_all()
        if not self.model:
            detail = next((e for e in LAST_ERRORS if "error loading model" in e), None) or "see HUATUO_LOCAL_VERBOSE=1"
            raise EngineError(f"{self.llm_path}: llama.cpp could not load the model ({detail})")
        cparams = llama_cpp.llama_context_default_params()
        # Each sequence gets its own KV stream of n_ctx cells (kv_unified off): a sequence's cells
        # start at 0 whatever the others hold, so its arithmetic is the same alone or beside others.
        cparams.n_ctx = opts.n_ctx * self.n_seq
        cparams.n_batch = opts.n_batch
        cparams.n_ubatch = opts.ubatch
        cparams.n_seq_max = self.n_seq
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.type_k = cparams.type_v = kv
        # llama.cpp keeps a quantized V cache only with flash attention (else it refuses the context).
        cparams.flash_attn_type = 1 if opts.flash_attn or kv != C.GGML_TYPE_F16 and kv != C.GGML_TYPE_F32 else 0
        cparams.no_perf = True
        LAST_ERRORS.clear()
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            self.model = None
            why = LAST_ERRORS[-1] if LAST_ERRORS else "out of memory? lower --ctx or --parallel"
            raise EngineError(f"{self.llm_path}: llama.cpp could not create a context of {cparams.n_ctx} tokens "
                              f"({why})")
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
        # With RPC workers the encoder stays on this machine (an RPC device counts as a GPU to libmtmd).
        params.use_gpu = bool(opts.mmproj_offload and opts.n_gpu_layers != 0 and not opts.rpc)
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        self.mtmd_ctx = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self.model, params)
        if not self.mtmd_ctx:
            raise EngineError(f"{self.mmproj_path}: libmtmd could not load the vision projector")
        self.marker = mtmd.mtmd_default_marker().decode()
        self.vision_warning: str | None = None
        self._vision_checked = False
        self._batch = llama_cpp.llama_batch_init(opts.n_batch, 0, 1)
        self._embd_batch = llama_cpp.llama_batch_init(opts.ubatch, self.n_embd, 1)

    # --- tokens -----------------------------------------------------------------------

    def _place_on_workers(self, opts: EngineOptions, llm_fields: dict, mparams) -> int:
        """Register the RPC workers and say how many layers go to them, split by tensor_split."""
        from . import rpc
        from .devices import local_gpus

        gpus = local_gpus()
        if gpus:
            raise EngineError(f"--rpc beside this machine's GPU ({gpus[0].description or gpus[0].name}) is not "
                              "supported yet (the layer split counts this machine's CPU memory, not the GPU's); "
                              "use the GPU alone, or lend it as a worker: huatuo-local rpc-worker --device "
                              f"{gpus[0].name.lower()}")
        workers = [rpc.probe(ep) for ep in opts.rpc]  # one line for a worker that is down, before loading
        rpc.register(list(opts.rpc))
        rpc.install_abort_message()
        arch = llm_fields.get("general.architecture", "")
        n_layer = int(llm_fields.get(f"{arch}.block_count", 0))
        from .doctor import GIB, memory_gib

        local_free = int(memory_gib()[1] * GIB)
        on_workers, shares = rpc.split(n_layer, workers, local_free,
                                       list(opts.tensor_split) if opts.tensor_split else None)
        llama_cpp = _llama()
        split = (ctypes.c_float * llama_cpp.llama_max_devices())()
        for i, share in enumerate(shares):  # RPC devices come in registration order (no local GPU)
            split[i] = share
        self._tensor_split = split  # llama.cpp copies it, but keep it alive through the load
        mparams.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        if opts.rpc_output_local:
            self._overrides = rpc.output_stays_local()
            mparams.tensor_buft_overrides = ctypes.cast(self._overrides, ctypes.c_void_p)
        mparams.n_gpu_layers = on_workers
        self.workers = workers
        return on_workers

    def _scan_vocab(self) -> tuple[dict[str, int], frozenset[int]]:
        """Added tokens HF matches verbatim in text (control tokens), and byte-fallback tokens."""
        llama_cpp = _llama()
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

    # --- evaluation (sequence-aware primitives; runtime/scheduler.py decides what runs when) ----

    def decode_tokens(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (seq, token, position, wants logits) entries; logits by batch index."""
        if len(entries) > self.options.n_batch:
            raise EngineError(f"internal: {len(entries)} tokens in one batch (n_batch {self.options.n_batch})")
        b = self._batch
        b.n_tokens = len(entries)
        for i, (seq, tok, pos, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = bool(logits)
        self._decode(b)

    def decode_embeddings(self, seq: int, embd: np.ndarray, pos: int) -> None:
        """Append image embeddings (n, n_embd) to `seq` from `pos` on, in one llama_decode."""
        n = len(embd)
        if n > self.options.ubatch:
            raise EngineError(f"internal: {n} embeddings in one batch (ubatch {self.options.ubatch})")
        b = self._embd_batch
        b.n_tokens = n
        flat = np.ascontiguousarray(embd, dtype=np.float32).reshape(-1)
        ctypes.memmove(b.embd, flat.ctypes.data, flat.nbytes)
        for i in range(n):
            b.pos[i] = pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = False
        self._decode(b)

    def _decode(self, batch) -> None:
        rc = _llama().llama_decode(self.ctx, batch)
        if rc == 2:
            raise DecodeAborted("stopped")
        if rc != 0:
            raise EngineError(f"llama_decode failed ({rc}); the context may be full, raise --ctx")

    def set_abort_check(self, check) -> None:
        """`check()` is asked between the graph's operations; True stops llama_decode (CPU only).

        It runs in llama.cpp's compute thread and takes the GIL each time, so it is only installed
        where stopping at once matters (an interactive chat), not for the server.
        """
        llama_cpp = _llama()
        self._abort_cb = llama_cpp.ggml_abort_callback(lambda _data: bool(check())) if check else None
        llama_cpp.llama_set_abort_callback(self.ctx, self._abort_cb, None)

    def logits_at(self, index: int) -> np.ndarray:
        """Logits of the batch entry `index` of the last decode: a view of llama.cpp's buffer, valid (and
        writable) until the next decode; sampling works on it in place instead of copying the vocabulary."""
        ptr = _llama().llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def seq_rm(self, seq: int, start: int) -> None:
        """Forget positions >= start of `seq`."""
        llama_cpp = _llama()
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), seq, start, -1)

    def encode_image(self, image: Image.Image) -> np.ndarray:
        """The projector's output for one prepared image, (image_tokens, n_embd); the vision probe first."""
        self.verify_vision()
        embd = self.image_embeddings(image)
        if len(embd) != self.image_tokens:
            raise EngineError(f"libmtmd gave {len(embd)} positions for an image, expected {self.image_tokens}")
        return embd

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

    def sequence_state(self, seq: int) -> bytes:
        """The KV state of `seq`, as llama.cpp serializes it."""
        llama_cpp = _llama()
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq)
        if written != size:
            raise EngineError(f"llama.cpp wrote {written} of {size} state bytes")
        return bytes(buf)

    def restore_sequence_state(self, seq: int, data: bytes) -> int:
        """Replace `seq` with a saved state; returns the positions restored, 0 on failure.

        On failure the sequence is left empty, never half-restored.
        """
        llama_cpp = _llama()
        self.seq_rm(seq, 0)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), seq) != len(data):
            self.seq_rm(seq, 0)
            return 0
        mem = llama_cpp.llama_get_memory(self.ctx)
        lo, hi = llama_cpp.llama_memory_seq_pos_min(mem, seq), llama_cpp.llama_memory_seq_pos_max(mem, seq)
        if lo != 0 or hi < 0 or hi + 1 > self.options.n_ctx:
            self.seq_rm(seq, 0)
            return 0
        return int(hi) + 1

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
        for name in ("_batch", "_embd_batch"):
            if getattr(self, name, None) is not None:
                _llama().llama_batch_free(getattr(self, name))
                setattr(self, name, None)
        if getattr(self, "ctx", None):
            _llama().llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            _llama().llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
