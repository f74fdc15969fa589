"""Everything that touches llama.cpp for one loaded model: load the GGUF pair, evaluate, encode images.

Its tokenizer (engine/tokenizer.py, the release's Hugging Face rules over llama.cpp's vocabulary) is
`Engine.tokenizer`. How the options are decided is core/loading.py's; the engine takes them as given
and changes nothing it is handed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from huatuo_local.models import gguf_keys as keys
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.gguf_check import check_gguf
from huatuo_local.models.sizing import DEFAULT_CTX
from huatuo_local.runtime.engine.loading import LOAD_MODES, FaultAhead, MappedPages
from huatuo_local.runtime.engine.placement import Plan, plan_placement
from huatuo_local.runtime.engine.tokenizer import Tokenizer
from huatuo_local.runtime.images.loader import VisionInput, prepare
from huatuo_local.runtime.llama import constants as C
from huatuo_local.runtime.llama.bindings import llama
from huatuo_local.runtime.llama.bindings import mtmd as mtmd_lib
from huatuo_local.runtime.llama.logs import LAST_ERRORS, quiet_logs
from huatuo_local.runtime.rpc import client as rpc
from huatuo_local.runtime.system import physical_cores
from huatuo_local.runtime.trace import mark
from PIL import Image

KV_TYPES = {"f32": C.GGML_TYPE_F32, "f16": C.GGML_TYPE_F16, "q8_0": C.GGML_TYPE_Q8_0}


class EngineError(HuatuoError):
    pass


def flash_attn_type(opts: EngineOptions, kv: int, on_gpu: bool) -> int:
    """llama.cpp's flash-attention setting for these options (see EngineOptions.flash_attn)."""
    if opts.flash_attn or kv not in (C.GGML_TYPE_F16, C.GGML_TYPE_F32):
        # llama.cpp keeps a quantized V cache only with flash attention (else it refuses the context).
        return C.LLAMA_FLASH_ATTN_TYPE_ENABLED
    if opts.flash_attn is None and on_gpu:
        return C.LLAMA_FLASH_ATTN_TYPE_AUTO
    return C.LLAMA_FLASH_ATTN_TYPE_DISABLED


def default_ubatch(on_gpu: bool, width: int) -> int:
    """The micro-batch when none is given: 512 on a GPU. On the CPU 256 up to the 7B's width (its prompt as fast
    as with 512, and ~80 MB less compute buffer) and 512, llama.cpp's own default, for wider models: at the 34B's
    width each micro-batch streams far larger weight matrices, and 256 made its prompt 9% slower in one of two
    measurements (the other: the same; BENCHMARKS.md, 2026-12-03)."""
    return 512 if on_gpu or width > 4096 else 256


class DecodeAborted(EngineError):
    """llama_decode stopped because the abort check said so; what it did is still in the KV cache."""


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
    # None: llama.cpp's own choice (on where the device supports it) when layers are on a GPU, as its
    # tools and server do: much faster prompts there. Off on the CPU, where it is no faster and the
    # fidelity figures were measured without it. A quantized KV cache always needs it.
    flash_attn: bool | None = None
    mmproj_offload: bool = True
    seed: int = 0
    n_seq: int = 1  # parallel sequences (server slots), each with n_ctx positions
    allow_unverified_vision: bool = False
    # How the weights reach memory (LOAD_MODES). None: "mmap-release" on CPU, "mmap" when offloading.
    load: str | None = None
    # llama.cpp RPC workers (HOST:PORT) that hold some of the layers (runtime/rpc/); the vision
    # encoder stays here. tensor_split: this machine's share first, then each worker's (None: by
    # free memory).
    rpc: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] | None = None
    rpc_output_local: bool = True  # the LM head's weights stay here: hidden states, not logits, cross the wire
    rpc_key_file: str | None = None  # the workers' key (runtime/rpc/channel.py): TLS, only they are reached
    # Calibration (runtime/quantize): every position's output is computed (llama.cpp otherwise skips the
    # last layer's rows nobody reads), and `observe_matmuls(weight_name, input_rows)` sees each weight
    # matrix's input, as llama.cpp's imatrix tool does.
    output_all: bool = False
    observe_matmuls: Callable[[str, np.ndarray], None] | None = None

    @property
    def threads(self) -> int:
        return self.n_threads or physical_cores()

    @property
    def ubatch(self) -> int:
        return self.n_ubatch or (256 if self.n_gpu_layers == 0 else 512)  # Engine settles it by where layers run


class Engine:
    """One loaded model: the LLM context with `n_seq` sequences and the libmtmd vision context.

    Only primitive operations live here; which sequence runs what, and when, is decided by
    runtime/core/scheduler.py.
    """

    def __init__(self, llm_path: str | Path, mmproj_path: str | Path, options: EngineOptions | None = None,
                 eos_id: int | None = None, placement: Plan | None = None, prefetch: tuple = ()):
        """`placement`: where the work goes (engine/placement.py), as core/loading.py planned it; without
        one, the options' own n_gpu_layers and rpc settings are planned here. `prefetch`: pictures (RGB, as
        loaded) the first question will bring, encoded while the LLM loads (see `_vision_beside_llm`)."""
        # The engine's own copy: what it fills in (the default context, the micro-batch) is not the caller's.
        self.options = opts = replace(options) if options is not None else EngineOptions()
        self.on_close: list = []  # called once when the model closes (core.loading: the offline guard's release)
        self.llm_path, self.mmproj_path = Path(llm_path), Path(mmproj_path)
        vision = self._check_files(opts)
        mark("files checked")
        if not opts.n_ctx:
            # Room for the release's own limits (6 images of 576 positions and a 512-token answer
            # need 3968) plus a conversation's history; 4096 overflowed within them. Like the
            # release's `generate`, this does not stop at the model's training context.
            opts.n_ctx = DEFAULT_CTX
        self.vision = VisionInput(int(vision[keys.IMAGE_SIZE]),
                                  tuple(float(x) for x in vision[keys.IMAGE_MEAN]))  # type: ignore[arg-type]
        # A LLaVA-1.5 image always takes (size / patch)^2 positions: 576 for CLIP ViT-L/14-336.
        self.image_tokens = (int(vision[keys.IMAGE_SIZE]) // int(vision[keys.PATCH_SIZE])) ** 2
        quiet_logs()
        LAST_ERRORS.clear()
        self.n_seq = max(1, opts.n_seq)
        if placement is None:
            placement = plan_placement(self.llm_path, self.mmproj_path, n_gpu_layers=opts.n_gpu_layers,
                                       mmproj_offload=opts.mmproj_offload, rpc=opts.rpc,
                                       tensor_split=opts.tensor_split, rpc_output_local=opts.rpc_output_local,
                                       rpc_key_file=opts.rpc_key_file)
        self.placement = placement
        # Layers on this machine's GPUs (with --rpc: this machine's share; the workers may have GPUs of their
        # own). -ngl 0 keeps everything here on the CPU, with or without workers.
        self._gpus = list(placement.gpus)
        self.on_gpu = placement.on_gpu
        self.rpc_layers = placement.workers.layers if placement.workers else 0
        self.workers = placement.workers.workers if placement.workers else []
        if opts.n_ubatch is None:
            opts.n_ubatch = default_ubatch(self.on_gpu, self.width)
        self._load(opts, vision, eos_id, prefetch)

    def _load(self, opts: EngineOptions, vision: dict, eos_id: int | None, prefetch: tuple) -> None:
        """The LLM, its context and tokenizer, and the projector (beside the LLM on the CPU)."""
        self._prefetched: dict[str, np.ndarray] = {}
        self.prefetch_hits = 0  # images whose encoding was done while the LLM loaded
        self.faulted_ahead = 0  # bytes of the LLM's buffer faulted in ahead of the loader (loading.FaultAhead)
        self._vision_header = vision
        self.marker = mtmd_lib().mtmd_default_marker().decode()
        self._vocab_model = None
        # On the CPU the projector loads, and the first question's images are encoded, on a thread of their own
        # while the LLM loads: libmtmd needs only the text model's vocabulary and sizes, which a vocabulary-only
        # load of the same file gives in a fraction of a second. A GPU is not driven from two threads at once, and
        # neither is an RPC worker's connection (ggml's RPC client shares one socket per worker: a second thread
        # asking a device's memory while the LLM's tensors go out corrupted the stream, 2 bench runs in 7).
        beside = None
        if not self.placement.vision_on_gpu and not self.placement.workers and not opts.rpc:
            beside = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="huatuo-vision-load")
            vision_job = beside.submit(self._vision_beside_llm, opts, [prepare(p, self.vision) for p in prefetch])
        try:
            self.model = self._load_model(opts)
            mark("LLM loaded")
            llama_cpp = llama()
            self.vocab = llama_cpp.llama_model_get_vocab(self.model)
            self.tokenizer = Tokenizer(self.vocab)
            # Its vocabulary scan runs beside the context's creation (close() waits for it: it reads the model).
            self._scan = threading.Thread(target=self.tokenizer.warm, name="huatuo-vocab-scan", daemon=True)
            self._scan.start()
            self.ctx = self._create_context(opts)
            mark("context created")
        except BaseException:
            if beside is not None:  # what the other thread made is freed with the rest (close)
                try:
                    self.mtmd_ctx = vision_job.result()
                except BaseException:
                    pass
                beside.shutdown()
            self.close()
            raise
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        proj_dim = int(vision.get(keys.PROJECTION_DIM, self.n_embd))
        mismatch = None if proj_dim == self.n_embd else EngineError(
            f"{self.mmproj_path}: this vision projector makes {proj_dim}-wide embeddings but the language "
            f"model expects {self.n_embd}; use the mmproj converted with this model")
        self.eos_id = int(eos_id if eos_id is not None else llama_cpp.llama_vocab_eos(self.vocab))
        if beside is not None:
            try:
                self.mtmd_ctx = vision_job.result()
            except BaseException:
                self.close()
                raise
            finally:
                beside.shutdown()
        elif mismatch is None:
            self.mtmd_ctx = self._load_vision(opts, self.model)
        if mismatch is not None:  # nothing of what was loaded is kept
            self.close()
            raise mismatch
        mark("projector loaded")
        self._batch = llama_cpp.llama_batch_init(opts.n_batch, 0, 1)
        self._embd_batch = llama_cpp.llama_batch_init(opts.ubatch, self.n_embd, 1)

    # --- loading ------------------------------------------------------------------------

    def _check_files(self, opts: EngineOptions) -> dict:
        """Both files exist and pass the bounded header walk before llama.cpp's parser sees a byte."""
        for p in (self.llm_path, self.mmproj_path):
            if not p.is_file():
                raise EngineError(f"{p}: no such model file")
        if opts.kv_type not in KV_TYPES:
            raise EngineError(f"--kv-type {opts.kv_type}: choose f16, f32 or q8_0")
        llm = check_gguf(self.llm_path, "llm").fields
        width = llm.get(keys.EMBEDDING_LENGTH.format(arch=llm.get(keys.ARCHITECTURE)), 0)
        self.width = int(width or 0)  # the LLM's hidden size (0: its header does not say)
        vision = check_gguf(self.mmproj_path, "mmproj").fields
        for key in (keys.IMAGE_SIZE, keys.IMAGE_MEAN, keys.PATCH_SIZE):
            if key not in vision:
                raise EngineError(f"{self.mmproj_path}: vision projector without {key}; convert the model again")
        return vision

    def _load_model(self, opts: EngineOptions):
        llama_cpp = llama()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = self.placement.n_gpu_layers
        on_workers = self.placement.workers  # held by self.placement: llama.cpp reads the split while it loads
        if on_workers is not None:
            on_workers.apply(mparams)
            devs = on_workers.devices
            self._devices = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
        elif self._gpus:
            self._devices = rpc.device_list()  # None unless RPC workers were registered in this process
        else:
            # The CPU only, named (an empty list): llama.cpp would otherwise still send large batches' matrix
            # products to a GPU it sees (its op offload), so -ngl 0 would not mean the CPU's arithmetic.
            self._devices = (ctypes.c_void_p * 1)(None)
        if self._devices is not None:
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        load = opts.load or ("mmap" if self.on_gpu else "mmap-release")
        if load not in LOAD_MODES:
            raise EngineError(f"unknown load mode {load!r}; use one of {', '.join(LOAD_MODES)}")
        # (llama-cpp-python's struct has `load_mode`; a `use_mmap` attribute would be silently ignored)
        mparams.load_mode = LOAD_MODES[load]
        release = MappedPages(self.llm_path) if load == "mmap-release" else None
        # The pages the loader will copy into, faulted in on the other core in the room the dropped pages leave.
        ahead = FaultAhead(self.llm_path.stat().st_size) if release is not None else None
        if release is not None:
            def progress(fraction: float, user: object) -> bool:
                ahead.progress(fraction)
                return release.progress(fraction, user)

            # Called by llama.cpp between tensors as loading proceeds (one thread; see MappedPages, FaultAhead).
            self._load_progress = llama_cpp.llama_progress_callback(progress)
            mparams.progress_callback = self._load_progress
        try:
            model = llama_cpp.llama_model_load_from_file(str(self.llm_path).encode(), mparams)
        finally:
            if ahead is not None:
                ahead.finish()
        if release is not None:
            self.faulted_ahead = ahead.faulted
            release.release_all()
        if not model:
            detail = next((e for e in LAST_ERRORS if "error loading model" in e), None) or "see HUATUO_LOCAL_VERBOSE=1"
            raise EngineError(f"{self.llm_path}: llama.cpp could not load the model ({detail})")
        return model

    def _create_context(self, opts: EngineOptions):
        llama_cpp = llama()
        kv = KV_TYPES[opts.kv_type]
        cparams = llama_cpp.llama_context_default_params()
        # Each sequence gets its own KV stream of n_ctx cells (kv_unified off): a sequence's cells
        # start at 0 whatever the others hold, so its arithmetic is the same alone or beside others.
        cparams.n_ctx = opts.n_ctx * self.n_seq
        cparams.n_batch = opts.n_batch
        cparams.n_ubatch = opts.ubatch
        cparams.n_seq_max = self.n_seq
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = opts.threads
        cparams.type_k = cparams.type_v = kv
        cparams.flash_attn_type = flash_attn_type(opts, kv, self.on_gpu)
        cparams.no_perf = True
        if opts.observe_matmuls is not None:
            from huatuo_local.runtime.engine.activations import matmul_observer

            self._observer = matmul_observer(opts.observe_matmuls)  # kept alive: llama.cpp calls it
            cparams.cb_eval = self._observer
        LAST_ERRORS.clear()
        ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(self.model)
            self.model = None
            why = LAST_ERRORS[-1] if LAST_ERRORS else "out of memory? lower --ctx or --parallel"
            raise EngineError(f"{self.llm_path}: llama.cpp could not create a context of {cparams.n_ctx} tokens "
                              f"({why})")
        return ctx

    def _vision_beside_llm(self, opts: EngineOptions, pictures: list) -> object:
        """The projector, loaded against a vocabulary-only load of the LLM's file, and `pictures` (prepared)
        encoded with it, by digest: what `encode_image` then returns without encoding again."""
        llama_cpp = llama()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        params.devices = ctypes.cast((ctypes.c_void_p * 1)(None), ctypes.c_void_p)  # nothing to place
        self._vocab_model = llama_cpp.llama_model_load_from_file(str(self.llm_path).encode(), params)
        if not self._vocab_model:
            raise EngineError(f"{self.llm_path}: llama.cpp could not read its vocabulary")
        ctx = self._load_vision(opts, self._vocab_model)
        # The embeddings' width from the projector's header (a vocabulary-only model knows no sizes); the engine
        # checks it against the LLM's once that has loaded, before any of them is used.
        width = int(self._vision_header.get(keys.PROJECTION_DIM, 0) or 0)
        for picture in pictures if width > 0 else []:
            digest = hashlib.sha256(picture.tobytes()).hexdigest()
            self._prefetched[digest] = self._embeddings(ctx, picture, width)
        mark("first images encoded beside the LLM's load")
        return ctx

    def _load_vision(self, opts: EngineOptions, text_model):
        m = mtmd_lib()
        params = m.mtmd_context_params_default()
        params.use_gpu = self.placement.vision_on_gpu
        # One GPU job at a time when the vision encoder and the LLM share a GPU: the scheduler encodes images
        # on its own thread while it decodes, and ggml does not promise that two threads may drive one device
        # at once (llama.cpp's own server never does). Seen: a Vulkan build on Debian 12's Mesa 22.3 software
        # driver segfaulted in llama_get_logits_ith when the REPL's encoder ran beside a decode, 4 runs of 4;
        # with this lock 0 of 5 (Mesa 25 did not crash either way). Each GPU step takes the lock, and a decode
        # waits for its results before it lets go: at most one image's encode of waiting, a fraction of a
        # second on a GPU. On the CPU (or with the encoder there) both still run side by side.
        self._one_at_a_time = params.use_gpu
        self._device_lock = threading.Lock() if params.use_gpu else contextlib.nullcontext()
        if params.use_gpu:
            # Named, not libmtmd's "first GPU in the registry": an RPC worker registered in this process counts
            # as a GPU there, and the encoder (the images) always stays on this machine.
            params.device = self._gpus[0].handle
        params.n_threads = opts.threads
        params.print_timings = False
        params.warmup = False
        ctx = m.mtmd_init_from_file(str(self.mmproj_path).encode(), text_model, params)
        if not ctx:
            raise EngineError(f"{self.mmproj_path}: libmtmd could not load the vision projector")
        return ctx

    # --- evaluation (sequence-aware primitives; core/scheduler.py decides what runs when) ----

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
            b.logits[i] = bool(logits) or self.options.output_all
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
            b.logits[i] = self.options.output_all
        self._decode(b)

    def _decode(self, batch) -> None:
        with self._device_lock:
            rc = llama().llama_decode(self.ctx, batch)
            if self._one_at_a_time:
                llama().llama_synchronize(self.ctx)  # its work done before the encoder may use the device
        if rc == 2:
            raise DecodeAborted("stopped")
        if rc != 0:
            raise EngineError(f"llama_decode failed ({rc}); the context may be full, raise --ctx")

    def set_abort_check(self, check) -> None:
        """`check()` is asked between the graph's operations; True stops llama_decode (CPU only).

        It runs in llama.cpp's compute thread and takes the GIL each time, so it is only installed
        where stopping at once matters (an interactive chat), not for the server.
        """
        llama_cpp = llama()
        self._abort_cb = (llama_cpp.ggml_abort_callback(lambda _data: bool(check())) if check
                          else ctypes.cast(None, llama_cpp.ggml_abort_callback))  # NULL: no callback
        llama_cpp.llama_set_abort_callback(self.ctx, self._abort_cb, None)

    def logits_at(self, index: int) -> np.ndarray:
        """Logits of the batch entry `index` of the last decode: a view of llama.cpp's buffer, valid (and
        writable) until the next decode; sampling works on it in place instead of copying the vocabulary."""
        ptr = llama().llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def seq_rm(self, seq: int, start: int) -> None:
        """Forget positions >= start of `seq`."""
        llama_cpp = llama()
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), seq, start, -1)

    def encode_image(self, image: Image.Image) -> np.ndarray:
        """The projector's output for one prepared image, (image_tokens, n_embd). Callers run
        `engine.probe.vision_warning` first: this library must be known to encode LLaVA images right."""
        embd = self._prefetched.pop(hashlib.sha256(image.tobytes()).hexdigest(), None) if self._prefetched else None
        if embd is None:
            embd = self.image_embeddings(image)
        else:
            self.prefetch_hits += 1
        if embd.shape != (self.image_tokens, self.n_embd):
            raise EngineError(f"libmtmd gave embeddings of shape {embd.shape} for an image, expected "
                              f"({self.image_tokens}, {self.n_embd})")
        return embd

    def _image_chunks(self, image: Image.Image, ctx=None):
        """libmtmd chunks for one prepared image (already padded and resized)."""
        mtmd = mtmd_lib()
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
        rc = mtmd.mtmd_tokenize(ctx or self.mtmd_ctx, chunks, ctypes.byref(text), bitmaps, 1)
        mtmd.mtmd_bitmap_free(bitmap)
        if rc != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise EngineError(f"libmtmd could not tokenize the image ({rc})")
        return chunks

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """The projector's output for one prepared image, (n_tokens, n_embd)."""
        return self._embeddings(self.mtmd_ctx, image, self.n_embd)

    def _embeddings(self, ctx, image: Image.Image, n_embd: int) -> np.ndarray:
        mtmd = mtmd_lib()
        chunks = self._image_chunks(image, ctx)
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == 0:
                    continue
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                with self._device_lock:  # see _load_vision
                    if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                        raise EngineError("libmtmd failed to encode the image")
                    ptr = mtmd.mtmd_get_output_embd(ctx)
                    return np.ctypeslib.as_array(ptr, shape=(n * n_embd,)).reshape(n, n_embd).copy()
            raise EngineError("libmtmd produced no image chunk")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def sequence_state(self, seq: int) -> bytes:
        """The KV state of `seq`, as llama.cpp serializes it."""
        llama_cpp = llama()
        with self._device_lock:  # copies the KV cache off the device (see _load_vision)
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
        llama_cpp = llama()
        self.seq_rm(seq, 0)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        with self._device_lock:  # copies onto the device (see _load_vision)
            restored = llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), seq)
        if restored != len(data):
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
        scan = getattr(self, "_scan", None)
        if scan is not None:  # the tokenizer's vocabulary scan reads the model: it ends first
            scan.join()
        # What was tied to this model's lifetime (core/loading.py: the offline guard), once.
        for release in getattr(self, "on_close", []):
            release()
        self.on_close = []
        if getattr(self, "mtmd_ctx", None):
            mtmd_lib().mtmd_free(self.mtmd_ctx)
            self.mtmd_ctx = None
        for name in ("_batch", "_embd_batch"):
            if getattr(self, name, None) is not None:
                llama().llama_batch_free(getattr(self, name))
                setattr(self, name, None)
        if getattr(self, "ctx", None):
            llama().llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama().llama_model_free(self.model)
            self.model = None
        if getattr(self, "_vocab_model", None):  # the projector's view of the vocabulary (_vision_beside_llm)
            llama().llama_model_free(self._vocab_model)
            self._vocab_model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
