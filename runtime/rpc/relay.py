"""The client's side of each RPC worker: a local endpoint llama.cpp connects to, carried to the worker.

llama.cpp's RPC client trusts its worker entirely: it allocates what the worker's device count says (a
worker claiming 4294967295 devices drove a client past 6 GB in seconds), indexes with it (17 devices: an
IndexError later), and waits forever for an answer that never comes. So llama.cpp never talks to a worker
directly. For each worker this process listens on 127.0.0.1 (a free port), accepts connections from this
process only, and carries each to the worker (with TLS and the key when there is one:
runtime/rpc/channel.py), reading along with the protocol's framing (runtime/rpc/wire.py):

- an answer must have the length its command gives it, a device count 1 to 16, and no bytes may come
  unasked;
- while an answer is awaited, the worker must send something within `timeout_s` (progress, not a total);
- Ctrl-C while llama.cpp waits on a worker cuts the wait (llama.cpp cannot be interrupted otherwise).

What breaks one of these closes the connection; llama.cpp then aborts the process, and the abort handler
(`client.install_abort_message`) says in one line why, from `failure()`.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import struct
import threading
import time
from collections import deque

from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.rpc import wire
from huatuo_local.runtime.rpc.channel import HANDSHAKE_TIMEOUT_S, connect, plain_end

DEFAULT_TIMEOUT_S = 120.0  # HUATUO_LOCAL_RPC_TIMEOUT: the longest a worker may stay silent while an answer is due
CHUNK = 1 << 20
INTERRUPT_GRACE_S = 3.0  # Ctrl-C: how long llama.cpp may still be waiting on a worker before the wait is cut
_RELAYS: list[Relay] = []
_FAILURE: list[str] = []  # the first reason a connection was cut, for the abort line


def timeout_s() -> float:
    try:
        value = float(os.environ.get("HUATUO_LOCAL_RPC_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        value = DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def failure() -> str | None:
    """Why a relay cut a connection (llama.cpp aborts after that), or None."""
    return _FAILURE[0] if _FAILURE else None


class _Cut(Exception):
    """End this connection; the message says why."""


class Relay:
    """llama.cpp's endpoint for one worker (`local`), relaying to `endpoint`."""

    def __init__(self, endpoint: str, context: ssl.SSLContext | None, timeout: float | None = None):
        self.endpoint, self.context = endpoint, context
        self.timeout = timeout or timeout_s()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.local = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._waiting: set[_Link] = set()  # links with an answer due
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"huatuo-rpc-relay {endpoint}", daemon=True).start()
        _RELAYS.append(self)

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            if not _from_this_process(peer, self._listener.getsockname()):  # not ours to carry
                conn.close()
                continue
            threading.Thread(target=self._carry, args=(conn,), daemon=True).start()

    def _carry(self, conn: socket.socket) -> None:
        try:
            upstream = connect(self.endpoint, self.context, HANDSHAKE_TIMEOUT_S)
        except HuatuoError as exc:
            _cut(str(exc), conn)
            return
        upstream.settimeout(None)
        if isinstance(upstream, ssl.SSLSocket):  # read and written from two threads below: one drives TLS
            upstream = plain_end(upstream)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(self, conn, upstream)
        threading.Thread(target=link.down, daemon=True).start()
        link.up()

    def close(self) -> None:
        """Stop listening (a relay whose worker llama.cpp did not take)."""
        if self in _RELAYS:
            _RELAYS.remove(self)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def waiting_since(self) -> float | None:
        with self._lock:
            times = [link.due_since for link in self._waiting if link.due_since is not None]
        return min(times) if times else None

    def cut_all(self, reason: str) -> None:
        with self._lock:
            links = list(self._waiting)
        for link in links:
            link.cut(reason)


class _Link:
    """One llama.cpp connection and its worker connection: requests go down, answers come up."""

    def __init__(self, relay: Relay, conn: socket.socket, upstream: socket.socket):
        self.relay, self.conn, self.upstream = relay, conn, upstream
        self.due: deque[tuple[int, int]] = deque()  # (command, answer length) in request order
        self.due_since: float | None = None
        self.ready = threading.Condition()
        self.closed = False

    def cut(self, reason: str | None) -> None:
        if reason and not self.closed:
            _FAILURE.append(reason)
        self.closed = True
        for s in (self.conn, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self.ready:
            self.ready.notify_all()
        with self.relay._lock:
            self.relay._waiting.discard(self)

    # --- llama.cpp -> worker ---------------------------------------------------------------

    def down(self) -> None:
        try:
            while True:
                head = _read(self.conn, 9)
                if head is None:
                    break
                command, size = struct.unpack("<BQ", head)
                if command >= wire.COMMANDS:
                    raise _Cut(f"llama.cpp sent an unknown RPC command {command}")
                small = command in (wire.HELLO, wire.GET_TENSOR) or size <= 4096
                data = _read(self.conn, size) if small else b""
                if data is None:
                    break
                if command == wire.HELLO:  # keep the stream on this socket: no transport upgrade
                    data = data[:-wire.CONN_CAPS] + bytes(wire.CONN_CAPS) if len(data) >= wire.CONN_CAPS else data
                answer = wire.answer_size(command, data)
                if answer is not None:
                    with self.ready:
                        if not self.due:
                            self.due_since = time.monotonic()
                            with self.relay._lock:
                                self.relay._waiting.add(self)
                        self.due.append((command, answer))
                        self.ready.notify_all()
                self.upstream.sendall(head + data)
                if not small:
                    _copy(self.conn, self.upstream, size)
        except _Cut as exc:
            self.cut(f"RPC worker {self.relay.endpoint}: {exc}")
            return
        except OSError:
            pass
        self.cut(None)  # llama.cpp closed (the model was freed): so does the worker's connection

    # --- worker -> llama.cpp ---------------------------------------------------------------

    def up(self) -> None:
        who = self.relay.endpoint
        try:
            while not self.closed:
                with self.ready:
                    expected = self.due[0] if self.due else None
                if expected is None:
                    if _readable(self.upstream, 0.5):
                        with self.ready:
                            if self.due:  # asked meanwhile: this is its answer
                                continue
                        # nothing asked: the worker may only close
                        if _read(self.upstream, 1) is None:
                            raise _Cut("closed the connection")
                        raise _Cut("sent bytes nobody asked for; not a worker to trust")
                    continue
                command, length = expected
                head = self._answer(8)
                (size,) = struct.unpack("<Q", head)
                if size != length:
                    raise _Cut(f"answered {size} bytes where the protocol has {length}; not a worker of this "
                               "huatuo-local version, or not one to trust")
                if command == wire.DEVICE_COUNT:
                    body = self._answer(4)
                    (count,) = struct.unpack("<I", body)
                    if not 1 <= count <= wire.MAX_DEVICES:
                        raise _Cut(f"claims {count} devices (a machine lends 1 to {wire.MAX_DEVICES}); not a worker "
                                   "to trust")
                    self.conn.sendall(head + body)
                else:
                    self.conn.sendall(head)
                    remaining = size
                    while remaining:
                        chunk = self._answer(min(CHUNK, remaining))
                        self.conn.sendall(chunk)
                        remaining -= len(chunk)
                with self.ready:
                    self.due.popleft()
                    self.due_since = time.monotonic() if self.due else None
                    if not self.due:
                        with self.relay._lock:
                            self.relay._waiting.discard(self)
        except _Cut as exc:
            self.cut(f"RPC worker {who}: {exc}")
        except OSError:
            self.cut(None if self.closed else f"RPC worker {who}: the connection was lost (the worker stopped or the "
                                                 "network failed)")

    def _answer(self, n: int) -> bytes:
        """Up to `n` bytes of the awaited answer (exactly `n` for headers), each within the timeout."""
        buf = bytearray()
        while len(buf) < n:
            if not _readable(self.upstream, self.relay.timeout):
                raise _Cut(f"no answer for {self.relay.timeout:.0f} s (HUATUO_LOCAL_RPC_TIMEOUT); it stalled or "
                           "the network is down")
            chunk = self.upstream.recv(n - len(buf))
            if not chunk:
                raise _Cut("closed the connection in the middle of an answer")
            buf += chunk
            if n > 8 and buf:  # a data chunk: whatever arrived goes on at once
                break
        return bytes(buf)


def _readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def _read(sock: socket.socket, n: int) -> bytes | None:
    """Exactly `n` bytes, or None when the peer closed first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), CHUNK))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _copy(src: socket.socket, dst: socket.socket, size: int) -> None:
    while size:
        chunk = src.recv(min(size, CHUNK))
        if not chunk:
            raise OSError("closed")
        dst.sendall(chunk)
        size -= len(chunk)


def _cut(reason: str, conn: socket.socket) -> None:
    _FAILURE.append(reason)
    conn.close()


def _from_this_process(peer: tuple, listener: tuple) -> bool:
    """Whether the connecting socket is one of this process's own (Linux: /proc). Another user's program on
    this machine could otherwise use this process's authenticated way to the worker."""
    try:
        local, remote = f"0100007F:{peer[1]:04X}", f"0100007F:{listener[1]:04X}"
        inode = None
        with open("/proc/self/net/tcp", encoding="ascii") as f:
            next(f)
            for line in f:
                cells = line.split()
                # The connecting side's row (a closed earlier connection on that port has inode 0)
                if cells[1] == local and cells[2] == remote and cells[9] != "0":
                    inode = cells[9]
                    break
        if inode is None:
            return False
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == f"socket:[{inode}]":
                    return True
            except OSError:
                continue
        return False
    except (OSError, StopIteration, IndexError):
        return os.name != "posix" or not os.path.isdir("/proc")  # no /proc (macOS): not checkable here


_WATCHING = False


def watch_interrupts() -> None:
    """Ctrl-C while llama.cpp waits on a worker: cut the wait after a short grace, so the process ends within
    seconds instead of waiting on a stalled worker (a Python signal handler cannot run while the main thread
    is inside llama.cpp). Uses the signal wakeup fd, and only where nothing else uses it (not under asyncio)."""
    global _WATCHING
    if _WATCHING or threading.current_thread() is not threading.main_thread():
        return
    r, w = socket.socketpair()
    r.setblocking(True)
    w.setblocking(False)
    try:
        previous = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    except ValueError:
        return
    if previous != -1:  # someone else's (an event loop): leave it alone
        signal.set_wakeup_fd(previous)
        return
    _WATCHING = True
    keep = (r, w)

    def watch() -> None:
        while True:
            data = keep[0].recv(64)
            if signal.SIGINT not in data:
                continue
            signalled = time.monotonic()
            time.sleep(INTERRUPT_GRACE_S)
            for relay in _RELAYS:
                since = relay.waiting_since()
                if since is not None and since < signalled:  # still waiting on an answer asked before Ctrl-C
                    _FAILURE.insert(0, "interrupted")
                    relay.cut_all("interrupted")

    threading.Thread(target=watch, name="huatuo-rpc-interrupts", daemon=True).start()
