"""`huatuo-local rpc-worker`: llama.cpp's own RPC server, from the installed library, lending this machine's
memory to a model on another one.

Without a key, llama.cpp's server listens on --host itself (loopback by default; the protocol has no
authentication, see `worker_refusal`). With `--key-file`, huatuo-local listens on --host with TLS and
accepts only clients holding the same key (runtime/rpc/channel.py); a connection that does not finish
its handshake within 10 s is dropped, so an idle one cannot lock the owner out; and llama.cpp's server
listens on loopback inside a network namespace of its own (Linux user namespaces), where no other
program of this machine can reach it. Where namespaces are not available it listens on a random loopback
port, and the worker says that other users of this machine could reach that port.
"""

from __future__ import annotations

import ctypes
import os
import socket
import ssl
import sys
import threading
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.llama.devices import ggml
from huatuo_local.runtime.rpc.channel import HANDSHAKE_TIMEOUT_S, plain_end, server_context
from huatuo_local.runtime.rpc.client import PROTOCOL, rpc_library

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def worker_refusal(host: str, acknowledged: bool, keyed: bool = False) -> str | None:
    """Why a worker must not start on this address, or None."""
    if host in LOOPBACK or acknowledged or keyed:
        return None
    return (f"rpc-worker --host {host}: llama.cpp's RPC protocol has no authentication or encryption, and "
            "whoever reaches the port can run computations in this process and read what it holds. Give it a key "
            "(`huatuo-local rpc-worker --init-key KEY`, then --key-file KEY here and --rpc-key-file KEY on the "
            "client), keep it on 127.0.0.1 and tunnel it (ssh -N -L 50052:127.0.0.1:50052 THIS-MACHINE), or add "
            "--i-understand-rpc-is-unauthenticated to listen on a trusted private network")


def _listen(host: str, port: int) -> socket.socket:
    """The worker's public socket (SO_REUSEADDR: a restart right after a stop, with a client still connected
    in TIME_WAIT, binds at once instead of failing for a minute)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as exc:
        s.close()
        raise HuatuoError(f"rpc-worker {host}:{port}: cannot listen there ({exc.strerror}); pick another --port") \
            from None
    return s


def _isolate() -> bool:
    """Enter a network namespace of this process's own, with its loopback up: llama.cpp's server listening
    there is out of every other program's reach, while the sockets made before (the public one) stay in the
    machine's namespace. Linux only; False where user namespaces are not allowed. Call before any thread."""
    if not sys.platform.startswith("linux"):
        return False
    import fcntl
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newuser, clone_newnet = 0x10000000, 0x40000000
    flags = clone_newnet if os.geteuid() == 0 else clone_newuser | clone_newnet
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags) != 0:
        return False
    try:
        if flags & clone_newuser:  # be root inside it, mapped to ourselves outside: enough to bring up loopback
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"0 {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"0 {gid} 1")
        siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
        with socket.socket() as s:
            req = struct.pack("16sh", b"lo", 0)
            current = struct.unpack("16sh", fcntl.ioctl(s.fileno(), siocgifflags, req))[1]
            fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sh", b"lo", current | iff_up))
    except OSError:
        return False
    return True


def _private_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_worker(host: str, port: int, threads: int, device: str, cache: Path | None,
                 key_file: Path | None = None) -> None:
    """Run llama.cpp's RPC server in this process until SIGINT/SIGTERM (it never returns by itself)."""
    import signal

    if host == "::1" and key_file is None:
        raise HuatuoError("rpc-worker --host ::1: llama.cpp's RPC server listens on IPv4 only; use 127.0.0.1 (or "
                          "give --key-file: then huatuo-local listens, on any address)")
    bind_host = "127.0.0.1" if host == "localhost" and key_file is None else host
    context = server_context(key_file) if key_file is not None else None  # a bad key: one line, before anything
    public = _listen(bind_host, port)
    port = public.getsockname()[1]  # --port 0: a free one, printed below for the client
    if context is None:
        public.close()  # llama.cpp's server binds it itself (SO_REUSEADDR there too)
    else:
        public.listen(16)  # before "listening" is printed: a client may connect at once
    isolated = context is not None and _isolate()
    lib, g = rpc_library(), ggml()
    if lib is None:
        raise HuatuoError("this engine was built without llama.cpp's RPC backend; run scripts/bootstrap.py again")
    g.ggml_backend_load_all()
    dev = g.ggml_backend_dev_by_name(device.upper().encode())
    if not dev:
        raise HuatuoError(f"--device {device}: no such device here; `huatuo-local doctor` lists them (cpu, cuda0 ...)")
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    if cache is not None:
        from huatuo_local.models.private import private_dir

        private_dir(cache)
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    inner = f"127.0.0.1:{_private_port()}" if context is not None else f"{bind_host}:{port}"
    name = g.ggml_backend_dev_name(dev).decode()
    print(f"huatuo-local rpc-worker: listening on {shown}, protocol {PROTOCOL}, device {name} "
          f"({free.value / 1024**3:.1f} GiB free of {total.value / 1024**3:.1f} GiB), {threads} threads"
          + (", TLS with the key" if context else ", no authentication"), flush=True)
    if context is not None and not isolated:
        print(f"warning: no network namespace here (user namespaces are off), so llama.cpp's own port {inner} is "
              "reachable by other users of this machine; run the worker on a machine or in a container of its own",
              flush=True)
    key_hint = f" --rpc-key-file {key_file}" if key_file else ""
    print(f"use it with: huatuo-local chat IMAGE --rpc {shown}{key_hint}   (Ctrl-C stops it)", flush=True)
    devices = (ctypes.c_void_p * 1)(dev)
    stopped = threading.Event()

    def run() -> None:
        lib.ggml_backend_rpc_start_server(inner.encode(), str(cache).encode() if cache else None, threads, 1,
                                          devices)
        stopped.set()  # returns only when it could not start

    def stop(signum, _frame) -> None:
        print("huatuo-local rpc-worker: stopped", flush=True)
        sys.stdout.flush()
        os._exit(0)  # llama.cpp's server loop has no stop call

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=run, daemon=True).start()
    if context is not None:
        threading.Thread(target=_front, args=(public, context, inner), daemon=True).start()
    while not stopped.wait(0.5):
        pass
    raise HuatuoError(f"rpc-worker {shown}: llama.cpp's server did not start (see the lines above)")


def _front(public: socket.socket, context: ssl.SSLContext, inner: str) -> None:
    """Accept TLS clients holding the key and carry each to llama.cpp's server, one at a time (llama.cpp
    serves one connection at a time: a second client is closed at once rather than left waiting)."""
    busy = threading.Lock()
    while True:
        try:
            raw, _peer = public.accept()
        except OSError:
            continue
        threading.Thread(target=_session, args=(raw, context, inner, busy), daemon=True).start()


def _session(raw: socket.socket, context: ssl.SSLContext, inner: str, busy: threading.Lock) -> None:
    raw.settimeout(HANDSHAKE_TIMEOUT_S)  # an idle or slow connection is dropped, never holds the worker
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        conn = context.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError):
        raw.close()  # no key, a wrong key, or nothing at all: dropped before llama.cpp sees a byte
        return
    if not busy.acquire(blocking=False):
        conn.close()  # authenticated, but another client's model is loaded here
        return
    try:
        conn.settimeout(None)
        conn = plain_end(conn)  # one thread drives TLS; the pipe below reads and writes from two
        host, _, port = inner.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=HANDSHAKE_TIMEOUT_S) as back:
            back.settimeout(None)
            back.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _pipe(conn, back)
    except OSError:
        pass
    finally:
        conn.close()
        busy.release()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Bytes both ways until either side closes."""
    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(1 << 20):
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join()
