"""What huatuo-local knows of llama.cpp's RPC protocol (ggml-rpc.cpp of the pinned llama.cpp, 7.0.0): the
framing, which commands are answered and how long each answer is, and the three exchanges a probe needs.

    request : | command (1 byte) | size (u64) | data (size bytes) |
    answer  : | size (u64) | data (size bytes) |          (only the commands in ANSWERED)

Nothing here changes a byte of what llama.cpp sends (the relay only reads along, and clears the
transport-upgrade capabilities of HELLO so that the stream stays on the socket it watches); it is what
lets every exchange have a bound and a deadline: an answer of the wrong length, a device count no machine
has, or a worker that stops answering ends the connection with one line, instead of llama.cpp allocating
what a hostile worker asks or waiting forever.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from huatuo_local.models.errors import HuatuoError

PROTOCOL = (7, 0, 0)  # RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION of ggml-rpc.h
MAX_DEVICES = 16  # more than any machine lends; llama.cpp registers (and allocates) one device per count
CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE

# enum rpc_cmd
ALLOC_BUFFER, GET_ALIGNMENT, GET_MAX_SIZE, BUFFER_GET_BASE, FREE_BUFFER, BUFFER_CLEAR, SET_TENSOR, \
    SET_TENSOR_HASH, GET_TENSOR, COPY_TENSOR, GRAPH_COMPUTE, GET_DEVICE_MEMORY, INIT_TENSOR, GET_ALLOC_SIZE, \
    HELLO, DEVICE_COUNT, GRAPH_RECOMPUTE, MEMSET_TENSOR = range(18)
COMMANDS = 18
# sizeof(rpc_tensor): id u64, type u32, buffer u64, ne[4] u32, nb[4] u32, op u32, op_params[16] i32, flags i32,
# src[10] u64, view_src u64, view_offs u64, data u64, name[64], use_count i32: 296 bytes
RPC_TENSOR = 8 + 4 + 8 + 16 + 16 + 4 + 64 + 4 + 80 + 8 + 8 + 8 + 64 + 4
# The fixed length of each answered command's answer (GET_TENSOR's is the size it asked for).
ANSWERED: dict[int, int | None] = {
    ALLOC_BUFFER: 16, GET_ALIGNMENT: 8, GET_MAX_SIZE: 8, BUFFER_GET_BASE: 8, SET_TENSOR_HASH: 1,
    GET_TENSOR: None, COPY_TENSOR: 1, GET_DEVICE_MEMORY: 16, GET_ALLOC_SIZE: 8, HELLO: 4 + CONN_CAPS,
    DEVICE_COUNT: 4,
}


def answer_size(command: int, request: bytes) -> int | None:
    """The length the answer to `request` must have; None when the command is not answered."""
    if command not in ANSWERED:
        return None
    fixed = ANSWERED[command]
    if fixed is not None:
        return fixed
    # rpc_msg_get_tensor_req: tensor, offset u64, size u64
    return struct.unpack_from("<Q", request, RPC_TENSOR + 8)[0] if len(request) >= RPC_TENSOR + 16 else -1


_WHY_CLOSED = ("it serves one client at a time, or it was started with a key this client did not give "
               "(--rpc-key-file)")


class WorkerError(HuatuoError):
    """A worker broke the protocol or did not answer in time; the message names it."""


@dataclass(frozen=True)
class WorkerMemory:
    devices: int
    free: int  # bytes, all devices together
    total: int


def _recv(sock: socket.socket, n: int, who: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise WorkerError(f"RPC worker {who}: no answer in time; is it busy serving another client (a worker "
                              "serves one at a time), stalled, or behind a firewall?") from None
        except OSError as exc:
            raise WorkerError(f"RPC worker {who}: the connection failed ({exc.strerror or exc}); {_WHY_CLOSED}") \
                from None
        if not chunk:
            raise WorkerError(f"RPC worker {who}: closed the connection; {_WHY_CLOSED}")
        buf += chunk
    return bytes(buf)


def exchange(sock: socket.socket, command: int, data: bytes, who: str) -> bytes:
    """One answered command: its answer's bytes, checked for the length the protocol gives them."""
    sock.sendall(struct.pack("<BQ", command, len(data)) + data)
    (size,) = struct.unpack("<Q", _recv(sock, 8, who))
    want = answer_size(command, data)
    if size != want:
        raise WorkerError(f"RPC worker {who}: answered {size} bytes where the protocol has {want}; not a "
                          "huatuo-local / llama.cpp worker of this version")
    return _recv(sock, size, who)


def probe_memory(sock: socket.socket, who: str) -> WorkerMemory:
    """HELLO (the version), the device count (bounded) and each device's memory, as llama.cpp asks them."""
    major, minor, patch = struct.unpack_from("<BBB", exchange(sock, HELLO, bytes(CONN_CAPS), who))
    if major != PROTOCOL[0] or minor > PROTOCOL[1]:
        raise WorkerError(f"RPC worker {who} speaks protocol {major}.{minor}.{patch}, this engine "
                          f"{'.'.join(map(str, PROTOCOL))}; run the same huatuo-local version on both machines")
    (devices,) = struct.unpack("<I", exchange(sock, DEVICE_COUNT, b"", who))
    if not 1 <= devices <= MAX_DEVICES:
        raise WorkerError(f"RPC worker {who} claims {devices} devices (a machine lends 1 to {MAX_DEVICES}); not a "
                          "worker to trust")
    free = total = 0
    for device in range(devices):
        f, t = struct.unpack("<QQ", exchange(sock, GET_DEVICE_MEMORY, struct.pack("<I", device), who))
        if f > t or t > 1 << 50:  # a petabyte: no device has that
            raise WorkerError(f"RPC worker {who} claims {f} bytes free of {t} on device {device}; not a worker to "
                              "trust")
        free, total = free + f, total + t
    return WorkerMemory(devices, free, total)
