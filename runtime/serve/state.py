"""What a running server knows: its configuration, the model once loaded, and who is asking.

The model loads on a thread while the server already answers (`/health` says 503 until it is ready).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from huatuo_local.runtime.cluster.config import ClusterConfig
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.serve.backend import Backend, LocalBackend
from huatuo_local.runtime.serve.errors import ApiError
from huatuo_local.runtime.serve.request_images import ImageLoader, Limits
from huatuo_local.runtime.serve.supervise import LAST_ERROR_ENV

RETRY_AFTER_S = 2
SHUTDOWN_GRACE_S = 8.0  # < uvicorn's timeout_graceful_shutdown (10 s, serve/server.py)
RPC_RETRY_S = 3.0  # how often a server whose RPC worker is down tries to load again


@dataclass
class ServeConfig:
    """The server's own settings; how the model is loaded is `model` (runtime/core/config.py), as everywhere."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(parallel=4))
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # each its own tenant (see Job.tenant)
    max_queue: int = 64
    allow_files: list[Path] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 32 * 1024 * 1024
    max_pixels: int | None = None
    # serve --ray: replicas on a Ray cluster instead of this process's scheduler (runtime/cluster/)
    cluster: ClusterConfig | None = None


def tenant_of(key: str) -> str:
    """A key's tenant: a digest, so that nothing stored or logged holds the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]



class ServerState:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.backend: Backend | None = None  # set once the model answers
        self._cluster = None  # serve --ray: the ClusterBackend, deployed by prepare() and ready after load()
        self.stop = threading.Event()
        self.model_id = config.model.model or ""
        self.provenance: dict | None = None
        self.quant = ""
        self.names: set[str] = set()
        # serve --rpc: why the last server ended (a worker stopped answering), until this one has loaded
        self.error: str | None = (f"the last attempt failed: {os.environ[LAST_ERROR_ENV]}; loading again"
                                  if os.environ.get(LAST_ERROR_ENV) else None)
        self.created = int(time.time())
        self.loader: ImageLoader | None = None
        self.shutting_down = False
        self.tenants = {key.encode("utf-8"): tenant_of(key) for key in config.api_keys}
    def prepare(self) -> None:
        """What must happen before the server listens: with --ray, join (or start) the cluster and deploy the
        replicas, so that a cluster that cannot be reached is one line and no server."""
        c = self.config
        if c.cluster is not None:
            from huatuo_local.runtime.cluster.backend import ClusterBackend

            self._cluster = ClusterBackend(c.model, c.cluster, c.max_queue, SHUTDOWN_GRACE_S)

    def load(self) -> None:
        if self._cluster is not None:
            return self._load_cluster()
        from huatuo_local.runtime.core.loading import open_model
        from huatuo_local.runtime.core.scheduler import Scheduler

        c = self.config
        while True:
            try:
                loaded = open_model(c.model)
                break
            except Exception as exc:  # reported by /health and every request; the server stays up
                self.error = str(exc)
                print(f"error: {exc}", file=sys.stderr, flush=True)
                if not (c.model.rpc and "RPC worker" in str(exc)):
                    return
                time.sleep(RPC_RETRY_S)  # a worker that is down or restarting: try again until it answers
        model, engine = loaded.model, loaded.engine
        self._serving(model.ref, model.name, model.store_name or "", model.quant or "?", loaded.provenance,
                      engine.vision)
        self.backend = LocalBackend(Scheduler(engine, loaded.cache, max_queue=c.max_queue))
        print(f"ready: {self.model_id} ({c.model.parallel} parallel, {engine.options.n_ctx} tokens of context each)"
              + (f"; {loaded.note}" if loaded.note else ""), file=sys.stderr, flush=True)

    def _load_cluster(self) -> None:
        backend = self._cluster
        try:
            info = backend.wait_ready(self.stop)
        except Exception as exc:  # reported by /health and every request; the server stays up
            self.error = str(exc)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return
        self._serving(info["ref"], info["name"], info["store_name"], info["quant"], info["provenance"],
                      info["vision"])
        self.backend = backend
        c = self.config
        print(f"ready: {self.model_id} on Ray ({c.cluster.address}): replicas answering as they start, "
              f"{info['parallel']} parallel and {info['n_ctx']} tokens of context each"
              + (f"; {info['note']}" if info.get("note") else ""), file=sys.stderr, flush=True)

    def _serving(self, ref: str, name: str, store_name: str, quant: str, provenance: dict | None, vision) -> None:
        c = self.config
        self.error = None
        self.model_id = ref
        self.provenance = provenance  # the model side of every answer's record (core/record.py)
        self.quant = quant
        self.names = {ref, name, store_name, str(c.model.model or "")} - {""}
        limits = Limits(c.max_image_bytes, c.max_pixels or Limits().max_pixels,
                        [p.expanduser().resolve() for p in c.allow_files])
        self.loader = ImageLoader(limits, vision)

    def close(self) -> None:
        self.stop.set()
        backend = self.backend or self._cluster
        if backend is not None:
            backend.close()

    def ready(self) -> Backend:
        if self.shutting_down:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        if self.backend is not None:
            return self.backend
        if self.error:
            raise ApiError(503, f"the model could not be loaded: {self.error}", "server_error", code="model_not_loaded")
        raise ApiError(503, "the model is still loading; try again shortly", "server_error", code="loading",
                       headers={"Retry-After": str(RETRY_AFTER_S)})

    def tenant(self, request: Request, required: bool = True) -> str | None:
        """The caller's tenant ("" without keys); None (or 401 when `required`) for a missing or wrong key."""
        if not self.tenants:
            return ""
        given = request.headers.get("authorization", "")
        # Compared as the bytes that came over the wire, so a UTF-8 key works as typed.
        token = given[7:].encode("latin-1") if given.lower().startswith("bearer ") else b""
        found = None
        for key, name in self.tenants.items():  # every key compared, in constant time each
            if hmac.compare_digest(token, key):
                found = name
        if found is None and required:
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")
        return found

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise ApiError(404, f"model {name[:100]!r} is not served here (this server serves {self.model_id})",
                           "not_found_error", "model", "model_not_found")


def state_of(request: Request) -> ServerState:
    return request.app.state.huatuo
