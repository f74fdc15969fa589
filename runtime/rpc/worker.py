"""`huatuo-local rpc-worker`: llama.cpp's own RPC server, from the installed library, lending this machine's
memory to a model on another one."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.llama.devices import ggml
from huatuo_local.runtime.rpc.client import PROTOCOL, rpc_library


def worker_refusal(host: str, acknowledged: bool) -> str | None:
    """Why a worker must not start on this address, or None."""
    if host in ("127.0.0.1", "localhost", "::1") or acknowledged:
        return None
    return (f"rpc-worker --host {host}: llama.cpp's RPC protocol has no authentication or encryption, and "
            "whoever reaches the port can run computations in this process and read what it holds. Keep it on "
            "127.0.0.1 and tunnel it (ssh -N -L 50052:127.0.0.1:50052 THIS-MACHINE on the client, or a WireGuard "
            "network), or add --i-understand-rpc-is-unauthenticated to listen on a trusted private network")

def serve_worker(host: str, port: int, threads: int, device: str, cache: Path | None) -> None:
    """Run llama.cpp's RPC server in this process until SIGINT/SIGTERM (it never returns by itself)."""
    import signal
    import socket
    import threading

    lib, g = rpc_library(), ggml()
    if lib is None:
        raise HuatuoError("this engine was built without llama.cpp's RPC backend; run scripts/bootstrap.py again")
    g.ggml_backend_load_all()
    dev = g.ggml_backend_dev_by_name(device.upper().encode())
    if not dev:
        raise HuatuoError(f"--device {device}: no such device here; `huatuo-local doctor` lists them (cpu, cuda0 ...)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise HuatuoError(f"rpc-worker {host}:{port}: cannot listen there ({exc.strerror}); pick another "
                              "--port") from None
        port = s.getsockname()[1]  # --port 0: a free one, printed below for the client
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    if cache is not None:
        from huatuo_local.models.private import private_dir

        private_dir(cache)
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = g.ggml_backend_dev_name(dev).decode()
    print(f"huatuo-local rpc-worker: listening on {endpoint}, protocol {PROTOCOL}, device {name} "
          f"({free.value / 1024**3:.1f} GiB free of {total.value / 1024**3:.1f} GiB), {threads} threads", flush=True)
    print(f"use it with: huatuo-local chat IMAGE --rpc {endpoint}   (Ctrl-C stops it)", flush=True)
    devices = (ctypes.c_void_p * 1)(dev)
    stopped = threading.Event()

    def run() -> None:
        lib.ggml_backend_rpc_start_server(endpoint.encode(), str(cache).encode() if cache else None, threads, 1,
                                          devices)
        stopped.set()  # returns only when it could not start

    def stop(signum, _frame) -> None:
        print("huatuo-local rpc-worker: stopped", flush=True)
        sys.stdout.flush()
        os._exit(0)  # llama.cpp's server loop has no stop call

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=run, daemon=True).start()
    while not stopped.wait(0.5):
        pass
    raise HuatuoError(f"rpc-worker {endpoint}: llama.cpp's server did not start (see the lines above)")
