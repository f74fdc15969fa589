"""Medical data stays on this machine: once a model is local, no network at all.

An audit hook refuses every socket connection and name lookup that leaves the loopback
interface, for the whole process, from any Python code (huggingface-hub included).
"""

from __future__ import annotations

import ipaddress
import os
import sys

from huatuo_local.models.errors import HuatuoError

_INSTALLED = False
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


class NetworkBlocked(HuatuoError):
    pass


def _is_local(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host)
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _hook(event: str, args: tuple) -> None:
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and address and not _is_local(address[0]):
            raise NetworkBlocked(f"network access to {address[0]} refused: huatuo-local runs offline")
    elif event == "socket.getaddrinfo":
        if not _is_local(args[0]):
            raise NetworkBlocked(f"name lookup of {args[0]} refused: huatuo-local runs offline")


def forbid_network() -> None:
    """Install the guard (irreversible for this process) and tell libraries to stay offline."""
    global _INSTALLED
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if not _INSTALLED:
        sys.addaudithook(_hook)
        _INSTALLED = True
