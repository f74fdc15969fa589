"""The server's side of a cluster: replicas deployed on Ray Serve, each request handed to one through the
affinity router, its events streamed back. `ClusterBackend` has the surface of serve/backend.py's
`LocalBackend`, so the routes, the guard, keys and tenants are the same code for both."""

from __future__ import annotations

import asyncio
import secrets
import sys
import threading
import time
from collections.abc import Callable

from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.cluster import registry
from huatuo_local.runtime.cluster.config import ClusterConfig
from huatuo_local.runtime.cluster.deploy import DEPLOYMENT, deployment_options, placement
from huatuo_local.runtime.cluster.replica import Replica
from huatuo_local.runtime.cluster.session import RaySession
from huatuo_local.runtime.cluster.wire import Accepted, Fault, Refused, ReplicaLost
from huatuo_local.runtime.core.chat_task import ChatTask
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.core.events import Done, Event, Failed, Piece
from huatuo_local.runtime.core.scheduler import QueueFull, ShuttingDown
from huatuo_local.runtime.engine.engine import EngineError

RETRIES = 3  # replicas tried for an answer none of whose tokens were sent yet
RETRY_PAUSE_S = 0.5  # for Ray Serve to learn that a replica is gone
STATUS_EVERY_S = 1.0  # how often the replicas' states are asked of Ray Serve


class ClusterBackend:
    def __init__(self, model: ModelConfig, cluster: ClusterConfig, max_queue: int, grace_s: float):
        self.cluster = cluster.check()
        _, hi = cluster.bounds()
        private = cluster.address == "local"
        # A private cluster declares the CPUs its replicas need; a cluster of machines is asked for its GPUs.
        planned = placement(model, cluster, True, 0) if private else None
        self.session = RaySession(cluster.address, num_cpus=planned[2] if planned else None)
        if self.session.private:
            print(f"huatuo-local serve: a private Ray cluster on this machine, on loopback (its files: "
                  f"{self.session.folder}, owner-only, removed when the server stops)", file=sys.stderr, flush=True)
        try:
            import logging

            from ray import serve

            # Ray Serve's own progress lines (started, connecting, deployed) are noise in a server's log.
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
            self.serve = serve
            if planned is None:
                planned = placement(model, cluster, False, self.session.ray.cluster_resources().get("GPU", 0))
            self.model, options, _ = planned
            # No Ray Serve HTTP proxy: this server is the only door (its guard, keys and tenants), and nothing
            # else of ours listens.
            serve.start(proxy_location="Disabled")
            self.app = f"huatuo-{secrets.token_hex(4)}"
            deployment = serve.deployment(Replica, name=DEPLOYMENT,
                                          **options, **deployment_options(self.model, cluster, max_queue, grace_s))
            cache_dir = str(cluster.cache_dir) if cluster.cache_dir else None
            self.handle = _deploy(serve, deployment.bind(self.model, max_queue, cache_dir), self.app)
        except BaseException:
            self.session.close()
            raise
        self.target = cluster.replicas
        self.max_in_flight = hi * (self.model.parallel + max_queue)
        self.in_flight = 0
        self.closing = False
        self.answers: set[RemoteAnswer] = set()
        self._counts: dict = {}
        # Ray Serve's status is a call to its controller: asked on a thread of its own, never on the event loop
        # that serves /health.
        threading.Thread(target=self._poll_status, name="huatuo-cluster-status", daemon=True).start()

    # --- ready -----------------------------------------------------------------------------

    def wait_ready(self, stop: threading.Event | None = None) -> dict:
        """Block until one replica runs; its description of the model (runtime/cluster/replica.py). A
        deployment Ray gave up on is one line: why the replica could not start."""
        while not (stop and stop.is_set()):
            app = self._app_status()
            if app is not None:
                dep = app.deployments.get(DEPLOYMENT)
                if app.status in ("DEPLOY_FAILED", "UNHEALTHY") or (dep and dep.status == "DEPLOY_FAILED"):
                    why = (dep and dep.message) or app.message
                    raise HuatuoError(f"the replicas could not start: {_first_line(why)}")
                if dep and dep.replica_states.get("RUNNING", 0) >= 1:
                    break
            time.sleep(0.5)
        else:  # the server stops before any replica ran
            raise HuatuoError("the server stopped before a replica started")
        return self.handle.describe.remote().result(timeout_s=120)

    def _app_status(self):
        return self.serve.status().applications.get(self.app)

    def complete(self) -> bool:
        """Every replica asked for runs (with autoscaling: at least the minimum)."""
        s = self._replica_counts()
        return s.get("RUNNING", 0) >= max(1, s.get("target", self.target))

    def _replica_counts(self) -> dict:
        return self._counts

    def _poll_status(self) -> None:
        while not self.closing:
            counts: dict = {}
            try:
                app = self._app_status()
                dep = app.deployments.get(DEPLOYMENT) if app else None
                if dep is not None:
                    counts = dict(dep.replica_states)
                    counts["target"] = (self.cluster.bounds()[0] if self.cluster.autoscaling else self.target) or 1
            except Exception as exc:  # the controller busy or restarting: say so, ask again
                counts = {"error": _first_line(str(exc))}
            self._counts = counts
            time.sleep(STATUS_EVERY_S)

    def status(self) -> dict:
        replicas, router = [], {}
        for r in list(registry.ROUTERS):
            try:
                replicas = r.replicas()
            except RuntimeError:  # its state changed while read (the router runs on Ray Serve's own thread)
                replicas = []
            router = {"routing": self.cluster.routing, "affinity_hits": r.hits, "affinity_misses": r.misses,
                      "overflows": r.overflows}
        return {"active": sum(int(r.get("active") or 0) for r in replicas),
                "queued": sum(int(r.get("queued") or 0) for r in replicas),
                "in_flight": self.in_flight, "cluster": {"address": self.cluster.address,
                                                         "replica_states": self._replica_counts(),
                                                         "replicas": replicas, **router}}

    # --- answers ---------------------------------------------------------------------------

    async def start(self, task: ChatTask, on_event: Callable[[Event], None]) -> RemoteAnswer:
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        if self.in_flight >= self.max_in_flight:
            raise QueueFull(f"{self.in_flight} requests are already in the cluster")
        answer = RemoteAnswer(self, task, on_event)
        self.in_flight += 1
        try:
            await answer.begin()
        except BaseException:
            self.in_flight -= 1
            raise
        self.answers.add(answer)
        return answer

    def finished(self, answer: RemoteAnswer) -> None:
        if answer in self.answers:
            self.answers.discard(answer)
            self.in_flight -= 1

    def shut_down(self, grace_s: float) -> None:
        """No new answers; those in flight get `grace_s`, then end with ShuttingDown."""
        self.closing = True
        loop = _running_loop()
        if loop is not None:
            loop.call_later(grace_s, self._cut_short)

    def _cut_short(self) -> None:
        for answer in list(self.answers):
            answer.abort(ShuttingDown("the server is shutting down; the answer was cut short"))

    def close(self) -> None:
        """End our replicas (a private cluster: all of it) and leave nothing of Ray running."""
        self.closing = True
        try:
            if self.session.private:
                self.serve.shutdown()
            else:
                self.serve.delete(self.app, _blocking=True)
        except Exception as exc:  # the cluster is already gone: nothing of ours is left to end
            print(f"huatuo-local serve: leaving the cluster: {_first_line(str(exc))}", file=sys.stderr, flush=True)
        finally:
            self.session.close()


class RemoteAnswer:
    """One answer on a replica, streamed back; retried on another replica while none of it was sent."""

    def __init__(self, backend: ClusterBackend, task: ChatTask, on_event: Callable[[Event], None]):
        self.backend, self.task, self.on_event = backend, task, on_event
        self.route = task.route_key()
        self.replica: dict | None = None
        self.tries = 0
        self._gen = None
        self._pump: asyncio.Task | None = None
        self._ended = False

    async def begin(self) -> None:
        """Hand the task to a replica; raises what the replica refused it with."""
        from ray.exceptions import RayError, RayTaskError

        while True:
            self.tries += 1
            gen = self.backend.handle.options(stream=True).chat.remote(self.task, route=self.route)
            try:
                first = await gen.__anext__()
            except RayTaskError as exc:
                raise EngineError(f"the replica failed: {_first_line(str(exc.cause or exc))}") from None
            except (RayError, StopAsyncIteration) as exc:
                if self.tries >= RETRIES:
                    raise ReplicaLost(f"no replica could take the request ({_first_line(str(exc))})") from None
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            if isinstance(first, Refused):
                raise first.error()
            assert isinstance(first, Accepted)
            self.replica = first.replica
            self._gen = gen
            if self._pump is None:
                self._pump = asyncio.get_running_loop().create_task(self._run())
            return

    async def _run(self) -> None:
        from ray.exceptions import RayError, RayTaskError

        sent = False
        try:
            while True:
                try:
                    async for event in self._gen:
                        if isinstance(event, Failed) and isinstance(event.error, Fault):
                            event = Failed(event.error.error())
                        if isinstance(event, Piece):
                            sent = True
                        self._emit(event)
                        if isinstance(event, (Done, Failed)):
                            return
                    self._emit(Failed(ReplicaLost("the replica ended the answer without finishing it")))
                    return
                except RayTaskError as exc:
                    self._emit(Failed(EngineError(f"the replica failed: {_first_line(str(exc.cause or exc))}")))
                    return
                except RayError as exc:
                    if sent or self.tries >= RETRIES or self.backend.closing:
                        self._emit(Failed(ReplicaLost(
                            f"the replica answering this request stopped ({_first_line(str(exc))}); ask again")))
                        return
                    # Nothing of the answer was sent: start it again on a live replica.
                    await asyncio.sleep(RETRY_PAUSE_S)
                    try:
                        await self.begin()
                    except Exception as again:
                        self._emit(Failed(again))
                        return
        except asyncio.CancelledError:
            if self._gen is not None:
                self._gen.cancel()
            raise
        finally:
            self.backend.finished(self)

    def _emit(self, event: Event) -> None:
        if self._ended:
            return
        self._ended = isinstance(event, (Done, Failed))
        self.on_event(event)

    def cancel(self) -> None:
        if self._gen is not None:
            self._gen.cancel()
        if self._pump is not None:
            self._pump.cancel()

    def abort(self, error: Exception) -> None:
        self._emit(Failed(error))
        self.cancel()


def _deploy(serve, app, name: str):
    """Deploy without waiting for every replica: the server answers once one runs (/health says when all do).
    Ray Serve's public `run` waits for all; its non-blocking form is `_run` (Ray 2.x), used when present."""
    try:
        from ray.serve.api import _run
    except ImportError:
        return serve.run(app, name=name, route_prefix=None)
    return _run(app, _blocking=False, name=name, route_prefix=None)


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown")[:300]
