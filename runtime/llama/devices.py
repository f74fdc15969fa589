"""This machine's devices as llama.cpp's own registry sees them, and how many layers fit on its GPUs.

`local_gpus()` asks libggml (the copy libllama loaded) for every device of type GPU or
integrated GPU: CUDA, Metal, Vulkan, HIP ... never an RPC worker, which registers as a GPU too.
`plan_offload()` decides the default placement from the GGUF's own tensor sizes: every layer
and the vision encoder on the GPU when they fit in its free memory with HEADROOM to spare;
otherwise the vision encoder first (a few hundred MB that save seconds per image), then as
many layers as fit. `--n-gpu-layers` overrides it.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

from huatuo_local.models import gguf_keys as keys
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.gguf_check import GGUFSummary
from huatuo_local.models.registry import GIB
from huatuo_local.models.sizing import KV_BYTES, FreeMemory
from huatuo_local.runtime.llama.constants import GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU

HEADROOM = GIB // 2  # left free on each GPU: the driver, the display, other programs


def _lib_dir() -> Path:
    import llama_cpp  # loads libllama and libggml first

    return Path(llama_cpp.__file__).parent / "lib"


def loaded_library(name: str) -> ctypes.CDLL | None:
    """The copy of llama.cpp's library `name` that libllama itself uses.

    A wheel cannot hold symlinks, so libggml.so, libggml.so.0 and libggml.so.0.x are separate copies:
    opening the wrong one gives a second, empty backend registry. The one already mapped (libllama's
    dependency, by soname) is the right one; else the soname file."""
    lib_dir = _lib_dir()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.split()[-1]
                if path.startswith(str(lib_dir)) and Path(path).name.startswith(name + ".so"):
                    return ctypes.CDLL(path)
    except OSError:
        pass
    for candidate in (lib_dir / f"{name}.so.0", lib_dir / f"{name}.so"):
        if candidate.is_file():
            return ctypes.CDLL(str(candidate))
    return None


def ggml() -> ctypes.CDLL:
    from huatuo_local.runtime.llama.logs import quiet_logs

    # Before the first look at the registry: that is when the backends start (ggml_cuda_init, ggml_vulkan) and
    # list their devices, which belongs in the log (HUATUO_LOCAL_VERBOSE=1), not on the user's terminal.
    quiet_logs()
    lib = loaded_library("libggml")
    if lib is None:
        raise HuatuoError("llama.cpp's libggml is missing from the engine; run scripts/bootstrap.py again")
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_dev_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_load_all.argtypes = []
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_get_props.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_backend_dev_get_props.restype = None
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_name.restype = ctypes.c_char_p
    lib.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_reg_get.restype = ctypes.c_void_p
    return lib


@dataclass(frozen=True)
class Gpu:
    name: str  # llama.cpp's device name (CUDA0, Metal, Vulkan0 ...)
    description: str  # the card (NVIDIA H200 ...)
    free: int
    total: int
    handle: int = 0  # ggml_backend_dev_t, for llama_model_params.devices


class DevCaps(ctypes.Structure):
    # ggml-backend.h: struct ggml_backend_dev_caps (tests/test_native.py checks the fields against the header)
    _fields_ = [("async", ctypes.c_bool), ("host_buffer", ctypes.c_bool), ("buffer_from_host_ptr", ctypes.c_bool),
                ("events", ctypes.c_bool), ("mmap_support", ctypes.c_bool)]


class DevProps(ctypes.Structure):
    # ggml-backend.h: struct ggml_backend_dev_props
    _fields_ = [("name", ctypes.c_char_p), ("description", ctypes.c_char_p), ("memory_free", ctypes.c_size_t),
                ("memory_total", ctypes.c_size_t), ("type", ctypes.c_int), ("device_id", ctypes.c_char_p),
                ("caps", DevCaps)]


@dataclass(frozen=True)
class RegistryDevice:
    """One device of llama.cpp's registry, as its default device choice weighs it."""

    kind: int  # enum ggml_backend_dev_type
    backend: str  # its registry's name: CUDA, Vulkan, Metal, RPC, CPU ...
    device_id: str | None  # the PCI bus id where the backend knows it


def default_choice(devices: list[RegistryDevice]) -> list[int]:
    """The indices of the devices llama.cpp itself puts a model on by default, in its order (src/llama.cpp,
    "default device selection"), less the RPC workers: the GPUs, each physical one once (a GPU seen by two
    backends, CUDA and Vulkan, has the same device id), and the integrated GPUs of one backend only when
    there is no other GPU. Doctor, the default placement and its memory sums must count these and no
    others: an integrated GPU beside a discrete one holds none of the model."""
    gpus: list[int] = []
    igpus: list[int] = []
    for i, d in enumerate(devices):
        if d.kind == GGML_BACKEND_DEVICE_TYPE_GPU and d.backend != "RPC":
            if d.device_id and any(devices[j].device_id == d.device_id for j in gpus):
                continue
            gpus.append(i)
        elif d.kind == GGML_BACKEND_DEVICE_TYPE_IGPU and (not igpus or devices[igpus[-1]].backend == d.backend):
            igpus.append(i)
    return gpus or igpus


def local_gpus() -> list[Gpu]:
    """The GPUs llama.cpp puts a model on by default on this machine (`default_choice`), in its order."""
    g = ggml()
    handles, seen = [], []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        kind = g.ggml_backend_dev_type(dev)
        if kind not in (GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU):
            continue
        backend = (g.ggml_backend_reg_name(g.ggml_backend_dev_backend_reg(dev)) or b"?").decode(errors="replace")
        if backend == "RPC":
            continue  # never asked: its props come over the network, and llama.cpp aborts if the worker is gone
        props = DevProps()
        g.ggml_backend_dev_get_props(dev, ctypes.byref(props))
        handles.append(dev)
        device_id = props.device_id.decode(errors="replace") if props.device_id else None
        seen.append(RegistryDevice(kind, backend, device_id))
    out = []
    for i in default_choice(seen):
        dev = handles[i]
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Gpu((g.ggml_backend_dev_name(dev) or b"?").decode(errors="replace"),
                       (g.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                       int(free.value), int(total.value), int(dev)))
    return out


def free_memory() -> FreeMemory:
    """This machine's free RAM and the free memory of the GPUs llama.cpp would use: what a model must fit."""
    from huatuo_local.runtime.system import available_memory

    gpus = local_gpus()
    return FreeMemory(available_memory(), sum(g.free for g in gpus) if gpus else None)


def _registry() -> list[tuple[str, int]]:
    """(name, number of devices) of each backend in llama.cpp's registry, in its order."""
    g = ggml()
    regs = [g.ggml_backend_reg_get(i) for i in range(g.ggml_backend_reg_count())]
    return [((g.ggml_backend_reg_name(r) or b"?").decode(errors="replace"), g.ggml_backend_reg_dev_count(r))
            for r in regs]


def built_backends() -> list[str]:
    """The backends the loaded engine was built with (CPU, RPC, CUDA, Metal ...), from llama.cpp's own
    registry: what this process really runs on, whichever build is installed or on the path."""
    return [name for name, _n in _registry()]


def idle_backends() -> list[str]:
    """The backends this engine was built with that found no device: a CUDA build on a machine whose
    NVIDIA driver is missing, or older than the CUDA the engine was built with, registers "CUDA" with
    no device (ggml_cuda_init logs the driver's own reason: HUATUO_LOCAL_VERBOSE=1 shows it).
    The CPU backend always has its device; an RPC backend gets its devices only from --rpc."""
    return [name for name, n in _registry() if name not in ("CPU", "RPC") and n == 0]


def no_device_note(idle: list[str]) -> str:
    """One line for a GPU build that found no GPU: why the CPU runs the model, and what to check."""
    if not idle:
        return ""
    check = ("Is NVIDIA's driver loaded, and at least as new as the CUDA the engine was built with? "
             "(`nvidia-smi` shows both" if "CUDA" in idle else "Is its driver installed, and the device visible "
             "to this user? (")
    return (f"no GPU: this engine is built for {', '.join(idle)} but it found no device, so the CPU runs the "
            f"model. {check}{'; ' if 'CUDA' in idle else ''}HUATUO_LOCAL_VERBOSE=1 shows the backend's own reason)")


@dataclass(frozen=True)
class Placement:
    n_gpu_layers: int  # for llama_model_params: -1 means every layer and the output
    layers_on_gpu: int
    n_layer: int
    vision_on_gpu: bool
    note: str  # one line for the user


_LAYER = re.compile(r"^blk\.(\d+)\.")


def _sizes(llm: GGUFSummary) -> tuple[list[int], int]:
    """Bytes of each repeating layer, and of everything else (embeddings, output)."""
    layers: dict[int, int] = {}
    other = 0
    for name, (_type, _shape, _offset, nbytes) in llm.tensors.items():
        m = _LAYER.match(name)
        if m:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + nbytes
        else:
            other += nbytes
    return [layers[i] for i in sorted(layers)], other


@dataclass(frozen=True)
class GpuNeeds:
    """What a model holds on a GPU, from its own GGUF: each repeating layer's weights, the rest of the weights
    (embeddings, output), one layer's KV cache, the compute buffer, and the vision encoder's weights and
    compute. tests/test_native.py compares them with what llama.cpp allocates."""

    layers: list[int]
    other: int
    kv_layer: int
    compute: int
    vision: int

    @property
    def full(self) -> int:
        """Every layer, its KV cache, the rest of the weights and the compute buffer (the vision encoder apart)."""
        return sum(self.layers) + len(self.layers) * self.kv_layer + self.other + self.compute


def gpu_needs(llm: GGUFSummary, mmproj: GGUFSummary, n_ctx_total: int, kv_type: str = "f16",
              ubatch: int = 512) -> GpuNeeds:
    layer_bytes, other = _sizes(llm)
    f = llm.fields
    arch = llm.arch
    n_embd = int(f.get(keys.llm_key(keys.EMBEDDING_LENGTH, arch), 0) or 0)
    n_head = int(f.get(keys.llm_key(keys.HEAD_COUNT, arch), 1) or 1)
    n_kv = int(f.get(keys.llm_key(keys.HEAD_COUNT_KV, arch), n_head) or n_head)
    embd = llm.tensors.get("token_embd.weight")
    n_vocab = int(embd[1][-1]) if embd else 32000  # shape (n_embd, n_vocab)
    kv_layer = int(2 * n_ctx_total * (n_embd // max(1, n_head)) * n_kv * KV_BYTES.get(kv_type, 2.0))
    # llama.cpp's compute buffer on the GPU: the logits of a micro-batch, a few activations of it, and the
    # attention mask over the context (f32 at most), which flash attention still builds (tests/test_native.py
    # checks this allowance against the buffer llama.cpp plans).
    compute = n_vocab * ubatch * 4 + 32 * ubatch * n_embd * 4 + n_ctx_total * ubatch * 4
    vision = sum(t[3] for t in mmproj.tensors.values()) + 256 * 1024**2  # weights + CLIP's compute buffer
    return GpuNeeds(layer_bytes, other, kv_layer, compute, vision)


def plan_offload(llm: GGUFSummary, mmproj: GGUFSummary, gpus: list[Gpu], n_ctx_total: int, kv_type: str = "f16",
                 ubatch: int = 512) -> Placement:
    """Where the model goes by default on these GPUs (see the module); the note says it in one line."""
    needs = gpu_needs(llm, mmproj, n_ctx_total, kv_type, ubatch)
    layer_bytes, kv_layer, compute, vision = needs.layers, needs.kv_layer, needs.compute, needs.vision
    n_layer = len(layer_bytes)
    if not gpus:
        return Placement(0, 0, n_layer, False, "no GPU: the model runs on the CPU")
    free = sum(max(0, g.free - HEADROOM) for g in gpus)
    where = " + ".join(f"{g.description or g.name} ({g.free / GIB:.1f} GiB free)" for g in gpus)
    full = needs.full
    if full + vision <= free:
        return Placement(-1, n_layer, n_layer, True, f"GPU {where}: all {n_layer} layers and the vision encoder")
    budget = free - compute
    vision_on_gpu = vision <= budget
    budget -= vision if vision_on_gpu else 0
    fit = 0
    for size in layer_bytes:
        if budget < size + kv_layer:
            break
        budget -= size + kv_layer
        fit += 1
    vision_text = "the vision encoder and " if vision_on_gpu else ""
    rest = "the output layer" if fit == n_layer else "the rest"  # -ngl n_layer keeps the output on the CPU
    note = (f"GPU {where}: {vision_text}{fit} of {n_layer} layers ({rest} on the CPU: the whole model needs "
            f"{(full + vision) / GIB:.1f} GiB; set --n-gpu-layers to choose)")
    return Placement(fit, fit, n_layer, vision_on_gpu, note)
