"""Medical data stays on this machine: while a model is open, no network at all.

An audit hook (PEP 578) refuses, for the whole process and from any Python code
(huggingface-hub included), every network event that could leave the loopback interface, from the
moment a model is opened until the last open model is closed (`HuatuoChatbot.close()`; a notebook
can use the network again after it):

| event                                   | refused when                           |
|-----------------------------------------|----------------------------------------|
| socket.connect                          | the address is not loopback            |
| socket.sendto, socket.sendmsg           | the address is not loopback (UDP)      |
| socket.getaddrinfo, gethostbyname(_ex)  | the name is not localhost or loopback  |
| socket.gethostbyaddr, socket.getnameinfo| the address is not loopback            |

Unix-domain sockets (a path, not a host) are local by nature and allowed. What an audit
hook cannot see: native code that opens sockets itself (a C library, llama.cpp) and child
processes. For certainty at the OS level, run inside a network namespace without
interfaces, e.g. `unshare -rn huatuo-local chat scan.png` or `docker run --network none`.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from huatuo_local.models.errors import HuatuoError

_INSTALLED = False
_HOLDERS = 0  # open models that hold the guard; the hook refuses only while there is one
_SAVED_ENV: dict[str, str | None] = {}
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
# Addresses allowed beside loopback: a cluster replica's own cluster (runtime/cluster/replica.py).
_ALLOWED: set[str] = set()
# Environment switches that keep Hugging Face libraries from trying the network at all.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}


class NetworkBlocked(HuatuoError):
    pass


def _is_local(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    host = str(host).strip().lower().rstrip(".")
    if host in _LOCAL_NAMES or host in _ALLOWED:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _address_is_local(address: object) -> bool:
    """A socket address: (host, port[, ...]) for IP, a str/bytes path for Unix sockets, None when connected."""
    if address is None or isinstance(address, (str, bytes, bytearray)):
        return True  # no destination (a connected socket) or a Unix-domain path
    if isinstance(address, tuple) and address:
        return _is_local(address[0])
    return False


def _refuse(what: str, target: object) -> None:
    raise NetworkBlocked(f"{what} {target!r} refused: huatuo-local runs offline while a model is open "
                         "(close it, e.g. bot.close(), to use the network again)")


def _hook(event: str, args: tuple) -> None:
    if not _HOLDERS or not event.startswith("socket."):
        return
    if event == "socket.connect":
        if not _address_is_local(args[1]):
            _refuse("network access to", args[1][0] if isinstance(args[1], tuple) else args[1])
    elif event in ("socket.sendto", "socket.sendmsg"):
        if not _address_is_local(args[1]):
            _refuse("sending to", args[1][0] if isinstance(args[1], tuple) else args[1])
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        if args[0] not in (None, "", b"") and not _is_local(args[0]):
            _refuse("name lookup of", args[0])
    elif event == "socket.gethostbyaddr":
        if not _is_local(args[0]):
            _refuse("address lookup of", args[0])
    elif event == "socket.getnameinfo":
        if not _address_is_local(args[0]):
            _refuse("address lookup of", args[0][0] if isinstance(args[0], tuple) else args[0])


class OfflineGuard:
    """One open model's hold on the guard; `release()` (idempotent) lets go of it."""

    def __init__(self) -> None:
        self._held = True

    def release(self) -> None:
        global _HOLDERS
        if not self._held:
            return
        self._held = False
        _HOLDERS -= 1
        if _HOLDERS == 0:  # the last open model: the process is as it was before
            for key, value in _SAVED_ENV.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _SAVED_ENV.clear()
            _set_hub_offline(os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False"))


def _set_hub_offline(offline: bool) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set its constant too if it is loaded.
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = offline


def allow_hosts(hosts) -> None:
    """Let the guard pass these addresses too, for the life of the process: a replica on a Ray cluster talks to
    the cluster's machines (Ray's own traffic is native code, which the guard cannot see anyway), never beyond."""
    _ALLOWED.update(str(h).strip().lower() for h in hosts if h)


def forbid_network() -> OfflineGuard:
    """Refuse the network until the returned guard is released, and tell libraries to stay offline.

    The audit hook is installed once (Python cannot remove one); it refuses while any guard is held."""
    global _INSTALLED, _HOLDERS
    if _HOLDERS == 0:
        _SAVED_ENV.update({key: os.environ.get(key) for key in OFFLINE_ENV})
    os.environ.update(OFFLINE_ENV)
    _set_hub_offline(True)
    _HOLDERS += 1
    if not _INSTALLED:
        sys.addaudithook(_hook)
        _INSTALLED = True
    return OfflineGuard()
