"""llama.cpp's RPC backend (ggml-rpc): other machines lend their memory to this one's model.

The worker is llama.cpp's own `ggml_backend_rpc_start_server` from the installed library (what its
`rpc-server` tool runs), and the client side registers each worker with `ggml_backend_rpc_add_server`,
after which llama.cpp places layers on it like on a GPU; huatuo-local changes no byte of llama.cpp's
stream.

llama.cpp aborts the whole process when a worker cannot be reached or speaks another protocol
version, and trusts every answer, so each worker is first asked for its version, devices and memory in
Python, with a deadline and bounds (runtime/rpc/wire.py): a problem becomes one line before anything
is loaded. Then llama.cpp reaches each worker through a relay of this process that keeps those bounds
and deadlines for every later exchange (runtime/rpc/relay.py), over TLS with a key when the worker has
one (runtime/rpc/channel.py, README "Two machines").
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from huatuo_local.models import gguf_keys as keys
from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.llama.constants import GGML_BACKEND_DEVICE_TYPE_CPU
from huatuo_local.runtime.llama.devices import Gpu, ggml, loaded_library, local_gpus
from huatuo_local.runtime.system import GIB, memory_gib

# ggml-rpc.h of the pinned llama.cpp (RPC_PROTO_*_VERSION); a worker must speak the same major
PROTOCOL = "7.0.0"
DEFAULT_PORT = 50052
PROBE_TIMEOUT_S = 15


def rpc_library() -> ctypes.CDLL | None:
    lib = loaded_library("libggml-rpc")
    if lib is None:
        return None
    lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    lib.ggml_backend_rpc_get_device_memory.argtypes = [ctypes.c_char_p, ctypes.c_uint32,
                                                        ctypes.POINTER(ctypes.c_size_t),
                                                        ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    return lib


def available() -> bool:
    """This engine build has llama.cpp's RPC backend."""
    try:
        return rpc_library() is not None
    except OSError:
        return False


# --- the client side ------------------------------------------------------------------------


def parse_endpoints(text: str) -> list[str]:
    """`HOST:PORT[,HOST:PORT...]` → endpoints, or one line saying what is wrong."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise HuatuoError(f"--rpc {part!r}: expected HOST:PORT (for example 192.168.1.20:{DEFAULT_PORT})")
        out.append(f"{host}:{int(port)}")
    if len(set(out)) != len(out):
        raise HuatuoError(f"--rpc {text}: a worker is named twice")
    return out


@dataclass(frozen=True)
class Worker:
    endpoint: str
    free: int
    total: int


def probe(endpoint: str, key_file: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> Worker:
    """Ask a worker for its version, devices and memory, in Python with a deadline on every exchange and
    bounds on every answer (runtime/rpc/wire.py): nothing llama.cpp would trust reaches it unchecked."""
    from huatuo_local.runtime.rpc import channel, wire

    if not available():
        raise HuatuoError("this engine was built without llama.cpp's RPC backend; run scripts/bootstrap.py again")
    context = channel.client_context(Path(key_file)) if key_file else None
    sock = channel.connect(endpoint, context, timeout)
    try:
        sock.settimeout(timeout)
        memory = wire.probe_memory(sock, endpoint)
    finally:
        sock.close()
    return Worker(endpoint, memory.free, memory.total)


_REGISTERED: dict[str, list[int]] = {}  # endpoint -> its llama.cpp devices, once per process
_RELAY_AT: dict[str, str] = {}  # endpoint -> where its relay listens in this process


def registered_relays() -> list[str]:
    """Where this process's relays listen, one per registered worker. They last as long as the process:
    llama.cpp's device registry cannot forget a worker, and reconnects to it when a model needs it again."""
    return sorted(_RELAY_AT.values())


def register(endpoints: list[str], key_file: str | None = None) -> None:
    """Make each worker a llama.cpp device (once per process), reached through a relay of this process
    (runtime/rpc/relay.py): llama.cpp never talks to a worker directly. Call `probe` first."""
    from huatuo_local.runtime.rpc import channel, relay

    lib, g = rpc_library(), ggml()
    if lib is None:
        raise HuatuoError("this engine was built without llama.cpp's RPC backend; run scripts/bootstrap.py again")
    context = channel.client_context(Path(key_file)) if key_file else None
    for ep in endpoints:
        if ep in _REGISTERED:
            continue
        carrier = relay.Relay(ep, context)
        relay.watch_interrupts()
        reg = lib.ggml_backend_rpc_add_server(carrier.local.encode())
        if not reg:
            carrier.close()
            raise HuatuoError(f"RPC worker {ep}: llama.cpp could not add it")
        g.ggml_backend_register(reg)
        _RELAY_AT[ep] = carrier.local
        _REGISTERED[ep] = [g.ggml_backend_reg_dev_get(reg, i) for i in range(g.ggml_backend_reg_dev_count(reg))]


def device_list():
    """This machine's GPUs, as llama_model_params.devices wants them (NULL-terminated), or None (llama.cpp's
    default choice) while no RPC worker is registered in this process.

    Registered workers stay in llama.cpp's process-wide registry, where its default device choice
    would pick them up for every later model (and abort when one is gone): once any worker is
    registered, a model without workers names its devices (a model with workers gets its own list from
    place_on_workers).
    """
    if not _REGISTERED:
        return None
    devs = [g.handle for g in local_gpus()]
    return (ctypes.c_void_p * (len(devs) + 1))(*devs, None)


class _BuftOverride(ctypes.Structure):
    # llama.h: struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def output_stays_local(gpu: int | None = None):
    """tensor_buft_overrides keeping the LM head's weights in this machine's memory: on `gpu` (a local
    GPU's ggml_backend_dev_t) when given, else in RAM.

    llama.cpp offloads the last layers, the output layer included: with it on a worker, every token's
    logits (the whole vocabulary in f32: 594 KiB for Qwen2's 152064 tokens) cross the network. With
    its weights here, only the last hidden state does (bench/rpc.py measures both)."""
    g = ggml()
    dev = gpu if gpu is not None else g.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    overrides = (_BuftOverride * 2)(_BuftOverride(rb"^output\.weight$", g.ggml_backend_dev_buffer_type(dev)),
                                    _BuftOverride(None, None))
    return overrides


def install_abort_message() -> None:
    """A worker that dies mid-answer makes llama.cpp abort the process: say so in one line first."""
    base = loaded_library("libggml-base")
    if base is None:
        return
    callback_t = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

    def on_abort(message: bytes | None) -> None:
        from huatuo_local.runtime.rpc.relay import failure

        text = (message or b"").decode(errors="replace").strip().splitlines()
        why = text[0] if text else "llama.cpp aborted"
        cut = failure()  # a relay ended the connection: its reason is the real one
        said = os.environ.get("HUATUO_LOCAL_FAILURE_FILE")  # serve --rpc's supervisor reports it on /health
        if said:
            try:
                with open(said, "w", encoding="utf-8") as f:
                    f.write(cut or why)
            except OSError:
                pass
        if cut == "interrupted":
            sys.stderr.write("interrupted\n")
            sys.stderr.flush()
            os._exit(130)
        if cut:
            sys.stderr.write(f"error: {cut}; restart the worker and ask again\n")
        elif "RPC" in why or "connect" in why:
            sys.stderr.write(f"error: an RPC worker stopped answering ({why}); restart it and ask again\n")
        else:
            sys.stderr.write(f"error: llama.cpp stopped: {why}\n")
        sys.stderr.flush()
        os._exit(3)  # instead of a core dump; the process cannot continue past llama.cpp's abort

    global _ABORT_CB
    _ABORT_CB = callback_t(on_abort)
    base.ggml_set_abort_callback.argtypes = [callback_t]
    base.ggml_set_abort_callback(_ABORT_CB)


_ABORT_CB = None


@dataclass
class WorkerPlacement:
    """The model parameters that put layers on the workers and this machine's GPUs (kept alive through the
    load), and where each layer goes, as llama.cpp will assign it."""

    n_gpu_layers: int  # llama.cpp's count: the last n of the repeating layers and the output go to `devices`
    layers: int  # repeating layers on the workers
    workers: list[Worker]
    devices: list[int]  # ggml_backend_dev_t, in llama.cpp's order: the workers', then this machine's GPUs
    tensor_split: object
    overrides: object | None
    note: str  # one line for the user: which layers went where

    def apply(self, mparams) -> None:
        mparams.n_gpu_layers = self.n_gpu_layers
        mparams.tensor_split = ctypes.cast(self.tensor_split, ctypes.POINTER(ctypes.c_float))
        if self.overrides is not None:
            mparams.tensor_buft_overrides = ctypes.cast(self.overrides, ctypes.c_void_p)


def place_on_workers(endpoints: tuple[str, ...], tensor_split: tuple[float, ...] | None, output_local: bool,
                     llm_fields: dict, model_bytes: int = 0, gpus: list[Gpu] | None = None,
                     key_file: str | None = None) -> WorkerPlacement:
    """Probe and register the workers, and split the layers over them and this machine (by tensor_split
    or free memory).

    This machine's share goes to `gpus` when given (its CUDA, Metal, Vulkan ... devices), else to its CPU.
    Devices are in llama.cpp's own order for RPC beside local GPUs: the workers first, this machine's GPUs
    last, so that the last layers and the output run here and only hidden states cross the network. With
    GPUs, the CPU keeps only the first layers that do not fit in the devices' free memory."""
    from huatuo_local.runtime.llama.bindings import llama
    from huatuo_local.runtime.llama.devices import HEADROOM

    gpus = gpus or []  # this machine's GPUs that take its share (none: -ngl 0, or a CPU-only machine)
    workers = [probe(ep, key_file) for ep in endpoints]  # one line for a worker that is down, before loading
    install_abort_message()  # before llama.cpp first talks to a worker (registering asks its devices)
    register(list(endpoints), key_file)
    arch = llm_fields.get(keys.ARCHITECTURE, "")
    n_layer = int(llm_fields.get(keys.llm_key(keys.BLOCK_COUNT, arch), 0))
    proportions = list(tensor_split) if tensor_split else None
    worker_devs = [list(_REGISTERED[ep]) for ep in endpoints]
    local_devs = [g.handle for g in gpus]
    if gpus:
        budgets = [max(0, g.free - HEADROOM) for g in gpus]
        _k, worker_shares, local_share = split(n_layer, workers, sum(budgets), proportions)
        gpu_shares = [local_share * b / sum(budgets) if sum(budgets) else local_share / len(gpus) for b in budgets]
        room = sum(budgets) + sum(w.free for w in workers)
        # Every layer on the devices when it fits; else the CPU keeps the first ones.
        on_devices = n_layer if not model_bytes or model_bytes <= room else int(n_layer * room / model_bytes)
    else:
        on_devices, worker_shares, _local = split(n_layer, workers, int(memory_gib()[1] * GIB), proportions)
        gpu_shares = []
    devices = [d for devs in worker_devs for d in devs] + local_devs
    shares = [share / len(devs) for share, devs in zip(worker_shares, worker_devs) for _ in devs] + gpu_shares
    # llama.cpp cuts the last n_gpu_layers of the layers *and the output* at the split's cumulative shares, so
    # shares alone would give the output a share of layers. Whole counts per device instead, the output riding
    # with the last device (a local GPU when there is one; with no GPU the override below keeps it in RAM).
    counts = whole_layers(on_devices, shares)
    if counts:
        counts[-1] += 1
    n_gpu_layers = on_devices + 1 if on_devices else 0
    split_c = (ctypes.c_float * llama().llama_max_devices())()
    for i, count in enumerate(counts):
        split_c[i] = count
    names = [_device_name(d) for d in devices]
    where = layer_devices(n_layer, n_gpu_layers, [float(c) for c in counts], names)
    local_names = {g.name for g in gpus}
    on_workers = sum(1 for w in where[:-1] if w != "CPU" and w not in local_names)
    # The LM head's weights stay here (see output_stays_local): on the GPU llama.cpp gives it anyway.
    overrides = output_stays_local(local_devs[-1] if local_devs else None) if output_local else None
    if overrides is not None:
        where[-1] = names[-1] if local_devs else "CPU"
    owners = [ep for ep, devs in zip(endpoints, worker_devs) for _ in devs]  # the workers' devices come first
    labels = {name: f"{name} ({ep})" for name, ep in zip(names, owners)}
    labels.update({g.name: f"{g.name} ({g.description})" for g in gpus})
    return WorkerPlacement(n_gpu_layers, on_workers, workers, devices, split_c, overrides,
                           placement_note(where, labels))


def whole_layers(n: int, shares: list[float]) -> list[int]:
    """`n` layers in whole numbers per device, in proportion to `shares` (largest remainders first)."""
    total = sum(shares)
    if not shares:
        return []
    if total <= 0:
        shares, total = [1.0] * len(shares), float(len(shares))
    exact = [n * s / total for s in shares]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _device_name(dev: int) -> str:
    return (ggml().ggml_backend_dev_name(dev) or b"?").decode(errors="replace")


def layer_devices(n_layer: int, n_gpu_layers: int, shares: list[float], names: list[str]) -> list[str]:
    """The device of each repeating layer, then of the output, as llama.cpp's load_tensors assigns them
    (src/llama-model.cpp): the last `n_gpu_layers` of the n_layer + 1 go to the devices in order, cut at
    the cumulative shares (in float32, as there); the rest stay on the CPU. All shares zero means by free
    memory there, which this does not model (callers never pass it with devices)."""
    import numpy as np

    if not names or n_gpu_layers <= 0:
        return ["CPU"] * (n_layer + 1)
    cum = np.cumsum(np.asarray(shares[: len(names)], dtype=np.float32), dtype=np.float32)
    cum = cum / cum[-1] if cum[-1] > 0 else np.linspace(1 / len(names), 1, len(names), dtype=np.float32)
    start = max(n_layer + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layer + 1)
    out = []
    for il in range(n_layer + 1):
        if il < start or il - start >= active:
            out.append("CPU")
        else:
            k = int(np.searchsorted(cum, np.float32(il - start) / np.float32(active), side="right"))
            out.append(names[min(k, len(names) - 1)])
    return out


def placement_note(where: list[str], labels: dict[str, str]) -> str:
    """One line: each device's run of layers (`where` from layer_devices, the output last)."""
    runs: list[tuple[str, int, int]] = []
    for il, dev in enumerate(where[:-1]):
        if runs and runs[-1][0] == dev and runs[-1][2] == il - 1:
            runs[-1] = (dev, runs[-1][1], il)
        else:
            runs.append((dev, il, il))

    def label(dev: str) -> str:
        return "this machine's CPU" if dev == "CPU" else labels.get(dev, dev)

    parts = [f"{'layer' if a == b else 'layers'} {a}{'' if a == b else f'-{b}'}" for _dev, a, b in runs]
    devices = [dev for dev, _a, _b in runs]
    if devices and devices[-1] == where[-1]:
        parts[-1] += " and the output"
    else:
        parts.append("the output")
        devices.append(where[-1])
    return "split: " + ", ".join(f"{part} on {label(dev)}" for part, dev in zip(parts, devices))


def split(n_layer: int, workers: list[Worker], local_free: int,
          proportions: list[float] | None) -> tuple[int, list[float], float]:
    """(repeating layers placed on the workers, each worker's share, this machine's share) from
    `--tensor-split LOCAL,W1,...` or free memory."""
    if proportions is not None:
        if len(proportions) != len(workers) + 1 or any(p < 0 for p in proportions) or sum(proportions) <= 0:
            raise HuatuoError(f"--tensor-split: give {len(workers) + 1} non-negative numbers, this machine's share "
                              "first, then each worker's (for example 1,1,1)")
        local, remote = proportions[0], proportions[1:]
    else:
        local, remote = float(local_free), [float(w.free) for w in workers]
    total = local + sum(remote)
    on_workers = n_layer if local == 0 else round(n_layer * sum(remote) / total)
    return on_workers, list(remote), local




