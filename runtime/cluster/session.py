"""Joining a Ray cluster, or starting a private one on this machine, and leaving nothing of it behind."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile

from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.system import descendants

# Ray's switch for machines where it supports no multi-machine cluster (Windows, macOS): off, a node's address is
# the loopback address (ray/_private/services.py get_node_ip_address).
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray puts its sockets at FOLDER/r/session_<date>_<time>_<pid>/sockets/plasma_store: up to 68 bytes below
# FOLDER, and a Unix socket's path holds at most 107.
MAX_FOLDER_CHARS = 36


def _short_private_folder() -> str:
    """An owner-only folder for a private cluster: under $TMPDIR when its path is short enough for Ray's
    sockets, else under /tmp."""
    folder = tempfile.mkdtemp(prefix="hr")
    if len(folder) <= MAX_FOLDER_CHARS:
        return folder
    os.rmdir(folder)
    return tempfile.mkdtemp(prefix="hr", dir="/tmp")


class RaySession:
    """`address` is a running cluster (HOST:PORT, `ray start --head` on it) or "local": a private cluster on
    this machine, listening on loopback only, its files in a folder of its own (Ray's default, /tmp/ray, would
    outlive us), every process of it ended by PID when the session closes (never `ray stop`, which would end
    every Ray process of the user)."""

    def __init__(self, address: str, num_cpus: int | None = None, flag: str = "--ray"):
        if address == "local" and "ray" not in sys.modules:
            # A private cluster is one machine: Ray's single-machine mode advertises the loopback address, and
            # every server of Ray's (GCS, raylet, object manager, workers, agents) then listens on it alone, not
            # on every interface. (Read by Ray when it is imported, and by every process it starts.)
            os.environ[SINGLE_MACHINE_ENV] = "0"
        try:
            import ray
        except ImportError:
            raise HuatuoError(f"{flag} needs Ray: pip install 'huatuo-local[distributed]'") from None
        self.ray = ray
        self.address = address
        self.folder: str | None = None
        self.joined = False
        if ray.is_initialized():
            return
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if address == "local":
                self.folder = _short_private_folder()
                # Pictures travel to replicas through Ray's object store (shared memory); never spilled to disk.
                # Ray opens its temporary folder to everyone (0777, again as each of its processes starts): it gets
                # one inside our owner-only folder, which no other user can enter.
                ray.init(_temp_dir=os.path.join(self.folder, "r"), num_cpus=num_cpus,
                         _system_config={"automatic_object_spilling_enabled": False}, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            self._remove_folder()
            raise HuatuoError(f"{flag} {address}: cannot join the Ray cluster ({str(exc).splitlines()[0]}); "
                              "start one with `ray start --head` or use --ray local") from None
        except OSError as exc:  # e.g. Ray's socket paths under a long TMPDIR exceed 107 bytes
            self._remove_folder()
            raise HuatuoError(f"{flag} {address}: cannot start Ray ({str(exc).splitlines()[0][:200]}); if the path "
                              "is too long, set TMPDIR to a shorter folder") from None
        self.joined = True

    @property
    def private(self) -> bool:
        return self.folder is not None

    def close(self) -> None:
        """Leave the cluster; a private one ends with every process it started (Ray's node agents outlive
        ray.shutdown() by a minute or more otherwise) and its folder."""
        if not self.joined:
            return
        self.joined = False
        ours = descendants() if self.private else []
        self.ray.shutdown()
        for pid in ours:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:  # already gone
                pass
        self._remove_folder()

    def _remove_folder(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
