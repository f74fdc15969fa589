"""One replica on the cluster: today's engine + scheduler in a Ray Serve replica actor (a process of its
own), answering tasks (core/chat_task.py) with a stream of the scheduler's events.

The class is plain; runtime/cluster/deploy.py makes it a Serve deployment with the placement and routing
options, so that importing this module needs no Ray.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from huatuo_local.runtime.cluster.wire import Accepted, Fault, Refused
from huatuo_local.runtime.core.chat_task import BadRequest, ChatTask, start_chat
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.core.events import Done, Failed, Progress
from huatuo_local.runtime.core.scheduler import ContextFull, QueueFull, Scheduler, ShuttingDown


def listen_on_node_address() -> None:
    """Ray Serve's replica starts a gRPC server for calls between deployments on every interface ("[::]:0",
    ray/serve/_private/replica.py); this replica's is put on its node's own address instead (loopback on a
    private cluster), as every server of Ray's core is. Called before Serve starts it (after our constructor)."""
    try:
        import ray
        from ray.serve._private import replica as serve_replica
    except ImportError:
        return
    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "huatuo_node_address", False):
        return
    ip = ray.util.get_node_ip_address()
    host = f"[{ip}]" if ":" in ip else ip

    def on_node_address(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    on_node_address.huatuo_node_address = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = on_node_address


def _allow_the_cluster() -> None:
    """The model's offline guard (core/offline.py) refuses every address but loopback; a replica's cluster is
    its machines, so their addresses are allowed, and nothing beyond them."""
    try:
        import ray
        from huatuo_local.runtime.core.offline import allow_hosts

        allow_hosts(n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive"))
    except Exception:  # outside Ray: loopback only, as everywhere
        pass


class Replica:
    def __init__(self, model: ModelConfig, max_queue: int, cache_dir: str | None = None):
        from huatuo_local.runtime.core.loading import open_model

        listen_on_node_address()
        _allow_the_cluster()
        from huatuo_local.runtime.core.prefix_cache import PrefixCache

        loaded = open_model(model)
        cache = loaded.cache
        if cache is not None and cache_dir:  # the cluster tier: a folder every node sees (ARCHITECTURE.md)
            cache = PrefixCache(Path(cache_dir), cache.identity, cache.budget // (1024 * 1024))
        self.loaded = loaded
        self.scheduler = Scheduler(loaded.engine, cache, max_queue=max_queue)
        try:
            import ray
            from ray import serve

            replica_id = serve.get_replica_context().replica_id.unique_id
            node_id = ray.get_runtime_context().get_node_id()[:12]
        except Exception:  # outside Serve (tests of this class alone)
            replica_id, node_id = f"p{os.getpid()}", ""
        self.identity = {"id": replica_id, "node": socket.gethostname(), "node_id": node_id, "pid": os.getpid()}

    def describe(self) -> dict:
        """What the server needs to know to check and record requests: the model, its picture size, its
        record (core/record.py). Every replica loads the same files, so any one answers for all."""
        model, engine = self.loaded.model, self.loaded.engine
        return {"ref": model.ref, "name": model.name, "store_name": model.store_name or "",
                "quant": model.quant or "?", "provenance": self.loaded.provenance,
                "vision": engine.vision, "n_ctx": engine.options.n_ctx,
                "parallel": engine.n_seq, "note": self.loaded.note, **self.identity}

    async def chat(self, task: ChatTask, route: str | None = None):
        """The task's events: first Accepted (or Refused, and nothing more), then Piece..., then Done or
        Failed. `route` is for the router (runtime/cluster/router.py), not used here. A stream the server
        cancels (its client went away) cancels the answer at once."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:  # tokenizing takes a moment: off the replica's event loop
            job = await asyncio.to_thread(start_chat, self.scheduler, task,
                                          lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except (BadRequest, ContextFull, QueueFull, ShuttingDown) as exc:
            yield Refused.of(exc)
            return
        yield Accepted(self.identity)
        ended = False
        try:
            while not ended:
                event = await events.get()
                if isinstance(event, Progress):
                    continue
                if isinstance(event, Failed):
                    event = Failed(Fault.of(event.error))  # type: ignore[arg-type]
                ended = isinstance(event, (Done, Failed))
                yield event
        finally:
            if not ended:
                job.cancel()

    def record_routing_stats(self) -> dict:
        """Ray Serve hands this to every router (runtime/cluster/router.py) and /health shows it."""
        return {**self.identity, "active": self.scheduler.active(), "queued": self.scheduler.queued()}

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose check fails: a scheduler whose loop has died answers nothing."""
        if not self.scheduler._thread.is_alive():
            raise RuntimeError("the scheduler's loop has stopped")

    def __del__(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close()
