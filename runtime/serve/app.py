"""`huatuo-local serve`: an OpenAI-compatible HTTP server on the one scheduler.

The routes only validate, translate (runtime/openai_api.py), submit a job to the scheduler
and stream its events; every error leaves in OpenAI's shape from one place. The model loads
in the background: /health answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import hmac
import io
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.core.items import conversation_items
from huatuo_local.runtime.core.scheduler import ContextFull, Job, QueueFull, Result, Scheduler, ShuttingDown
from huatuo_local.runtime.serve.guard import LocalGuard
from huatuo_local.runtime.serve.openai import ApiError, ChatRequest, ImageLoader, Limits, parse_chat
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

log = logging.getLogger("huatuo_local.serve")
RETRY_AFTER_S = 2
SHUTDOWN_GRACE_S = 8.0  # < uvicorn's timeout_graceful_shutdown (10 s) below


@dataclass
class ServeConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    parallel: int = 4
    api_keys: list[str] = field(default_factory=list)  # each its own tenant (see Job.tenant)
    n_gpu_layers: int | None = None
    ctx: int | None = None
    threads: int | None = None
    max_queue: int = 64
    allow_files: list[Path] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    prefix_cache: bool = True
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 32 * 1024 * 1024
    max_pixels: int | None = None
    allow_unverified_vision: bool = False
    rpc: str | None = None
    tensor_split: list[float] | None = None


DISCONNECT_CHECK_S = 1.0  # how often a non-streaming request checks that its client is still there
RPC_RETRY_S = 3.0  # how often a server whose RPC worker is down tries to load again


class _State:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.scheduler: Scheduler | None = None
        self.model_id = config.model or ""
        self.quant = ""
        self.names: set[str] = set()
        self.error: str | None = None
        self.created = int(time.time())
        self.loader: ImageLoader | None = None
        self.shutting_down = False
        self.port = config.port  # the port really bound (--port 0 picks one)

    def load(self) -> None:
        from huatuo_local.runtime.core.loading import open_model

        c = self.config
        while True:
            try:
                model, engine, cache = open_model(
                    c.model, n_gpu_layers=c.n_gpu_layers, n_ctx=c.ctx, threads=c.threads,
                    prefix_cache=c.prefix_cache, allow_unverified_vision=c.allow_unverified_vision, n_seq=c.parallel,
                    rpc=c.rpc, tensor_split=c.tensor_split)
                break
            except Exception as exc:  # reported by /health and every request; the server stays up
                self.error = str(exc)
                print(f"error: {exc}", file=sys.stderr, flush=True)
                if not (c.rpc and "RPC worker" in str(exc)):
                    return
                time.sleep(RPC_RETRY_S)  # a worker that is down or restarting: try again until it answers
        self.error = None
        self.model_id = model.ref
        self.quant = model.quant or "?"
        self.names = {model.ref, model.name, model.store_name or "", str(c.model or "")} - {""}
        limits = Limits(c.max_image_bytes, c.max_pixels or Limits().max_pixels,
                        [p.expanduser().resolve() for p in c.allow_files])
        self.loader = ImageLoader(limits, engine.vision)
        self.scheduler = Scheduler(engine, cache, max_queue=c.max_queue)
        print(f"ready: {self.model_id} ({c.parallel} parallel, {engine.options.n_ctx} tokens of context each)"
              + (f"; {engine.placement_note}" if engine.placement_note else ""), file=sys.stderr, flush=True)

    def ready(self) -> Scheduler:
        if self.shutting_down:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        if self.scheduler is not None:
            return self.scheduler
        if self.error:
            raise ApiError(503, f"the model could not be loaded: {self.error}", "server_error", code="model_not_loaded")
        raise ApiError(503, "the model is still loading; try again shortly", "server_error", code="loading",
                       headers={"Retry-After": str(RETRY_AFTER_S)})


class StreamText:
    """The answer as the release returns it (stripped), cut at the first stop string, emitted safely.

    Whitespace at the end, and any ending that could start a stop string, is held back until
    the next piece shows what it is.
    """

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.started, self.stopped = stops, "", False, False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buf += piece
        if not self.started:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return ""
            self.started = True
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[: min(hits)].rstrip(), "", True
            return out
        hold = len(self.buf) - len(self.buf.rstrip())
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def finish(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf.rstrip()), ""
        return out


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_positions, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_positions + len(result.tokens)}


def _extension(result: Result) -> dict:
    """Beyond OpenAI's fields: what the scheduler reused and how long things took."""
    return {**result.counters.__dict__, "first_token_s": round(result.timings.first_token_s, 4),
            "queued_s": round(result.timings.queued_s, 4), "generation_s": round(result.timings.generation_s, 4)}


def tenant_of(key: str) -> str:
    """A key's tenant: a digest, so that nothing stored or logged holds the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


# A request body's JSON may hold at most this many values (objects, arrays, items): a few images and a
# conversation need hundreds; 60 MB of `{}` would need tens of millions of Python objects (GBs).
MAX_JSON_VALUES = 100_000
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def json_values(chunk: bytes) -> int:
    """An upper bound on the JSON values a piece of a body opens or separates (objects, arrays, items)."""
    return chunk.count(b"{") + chunk.count(b"[") + chunk.count(b",")


def parse_body(raw: bytes) -> object:
    """A request body as JSON (its values already counted); text must be valid Unicode (no lone surrogates)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if _SURROGATE_ESCAPE.search(raw):  # only then can a string hold a lone surrogate
        _check_unicode(body)
    return body


def _check_unicode(value: object) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the request holds text that is not valid Unicode (an unpaired surrogate "
                                    "escape such as \\ud800)", code="invalid_text") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


class Disconnect:
    """Set once the client of a request has gone; work done in threads asks it between steps."""

    def __init__(self, request: Request):
        self.request, self.gone = request, threading.Event()

    async def watch(self) -> None:
        while not self.gone.is_set():
            if await self.request.is_disconnected():
                self.gone.set()
                return
            await asyncio.sleep(DISCONNECT_CHECK_S / 4)

    async def run(self, fn, *args):
        """`fn(*args)` in a thread while watching the client; `self.gone.is_set` is its cancel check."""
        watcher = asyncio.ensure_future(self.watch())
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            watcher.cancel()


def create_app(config: ServeConfig) -> FastAPI:
    state = _State(config)
    tenants = {key.encode("utf-8"): tenant_of(key) for key in config.api_keys}
    parsing = asyncio.Semaphore(2)  # large bodies parsed at once (memory), off the event loop

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="huatuo-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            state.scheduler.close()

    app = FastAPI(title="huatuo-local", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.huatuo = state
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return error_response(ApiError(exc.status_code, message, kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(ApiError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # never a traceback to a client
        log.exception("unexpected error")
        return error_response(ApiError(500, f"internal error ({type(exc).__name__})", "server_error"))

    def tenant(request: Request, required: bool = True) -> str | None:
        """The caller's tenant ("" without keys); None (or 401 when `required`) for a missing or wrong key."""
        if not tenants:
            return ""
        given = request.headers.get("authorization", "")
        # Compared as the bytes that came over the wire, so a UTF-8 key works as typed.
        token = given[7:].encode("latin-1") if given.lower().startswith("bearer ") else b""
        found = None
        for key, name in tenants.items():  # every key compared, in constant time each
            if hmac.compare_digest(token, key):
                found = name
        if found is None and required:
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")
        return found

    def check_model(name: str) -> None:
        if name not in state.names:
            raise ApiError(404, f"model {name[:100]!r} is not served here (this server serves {state.model_id})",
                           "not_found_error", "model", "model_not_found")

    async def read_json(request: Request) -> object:
        # Refused bodies close the connection: the rest of what the client sends is not read at all.
        too_large = ApiError(413, f"request body larger than {config.max_body_bytes // (1024 * 1024)} MB",
                             code="body_too_large", headers={"Connection": "close"})
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise too_large
        raw = bytearray()
        values = 0
        async for chunk in request.stream():
            raw += chunk
            values += json_values(chunk)
            if len(raw) > config.max_body_bytes:
                raise too_large
            if values > MAX_JSON_VALUES:  # refused as it arrives, before the rest is read or anything parsed
                raise ApiError(413, f"the request holds more than {MAX_JSON_VALUES} JSON values",
                               code="body_too_complex", headers={"Connection": "close"})
        if len(raw) < 65536:
            return parse_body(bytes(raw))
        async with parsing:
            return await run_in_threadpool(parse_body, bytes(raw))

    web = Path(__file__).parent / "web"

    @app.get("/")
    async def page():
        return FileResponse(web / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/static/{name}")
    async def static(name: str):
        files = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
        if name not in files:  # a fixed list: nothing else on disk can be asked for
            raise ApiError(404, f"no file {name[:80]}", "not_found_error")
        return FileResponse(web / name, media_type=files[name], headers={"Cache-Control": "no-store"})

    @app.post("/v1/huatuo/preview")
    async def preview(request: Request):
        """The exact picture the model receives for one image (window, frame, pad, 336 px), as PNG."""
        tenant(request)
        state.ready()
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("image_url"), dict):
            raise ApiError(400, "send {\"image_url\": {\"url\": \"data:...\", \"window\": ..., \"frame\": ...}}",
                           param="image_url")
        assert state.loader is not None
        watch = Disconnect(request)
        item, frames = await watch.run(state.loader.preview, body["image_url"], watch.gone.is_set)
        buf = io.BytesIO()
        item.picture.save(buf, format="PNG")
        return {"png": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "frames": frames,
                "width": item.picture.size[0], "height": item.picture.size[1], "digest": item.digest}

    @app.get("/health")
    async def health(request: Request):
        ok = state.scheduler is not None and not state.shutting_down
        status = "ok" if ok else "shutting_down" if state.shutting_down else "error" if state.error else "loading"
        if tenant(request, required=False) is None:  # without the key: only whether it can answer
            return JSONResponse({"status": status}, status_code=200 if ok else 503,
                                headers={} if ok else {"Retry-After": str(RETRY_AFTER_S)})
        if ok:
            assert state.scheduler is not None
            return {"status": "ok", "model": state.model_id, "quant": state.quant, "auth": bool(tenants),
                    "active": state.scheduler.active(), "queued": state.scheduler.queued()}
        return JSONResponse({"status": status, "error": state.error}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/v1/models")
    async def models(request: Request):
        tenant(request)
        state.ready()
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                            "owned_by": "huatuo-local"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        tenant(request)
        state.ready()
        check_model(name)
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "huatuo-local"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        who = tenant(request) or ""
        scheduler = state.ready()
        body = await read_json(request)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            check_model(body["model"])
        assert state.loader is not None
        watch = Disconnect(request)
        req: ChatRequest = await watch.run(parse_chat, body, state.loader, watch.gone.is_set)
        engine = scheduler.engine
        items = await run_in_threadpool(conversation_items, engine.tokenize, req.turns, req.images)
        if config.log_prompts:
            log.info("prompt: %s", json.dumps([t.text for t in req.turns], ensure_ascii=False))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(items, req.params, np.random.default_rng(req.seed), tenant=who,
                  on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            scheduler.submit(job)
        except ContextFull as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except QueueFull as exc:
            raise ApiError(503, f"the server is busy ({exc})", "server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDown:
            raise state_shutting_down() from None
        reply = Reply(job, StreamText(req.stop), state.model_id)
        if req.stream:
            # On SIGTERM, answers in flight get SHUTDOWN_GRACE_S to finish with their last chunk and
            # [DONE] (sse-starlette would otherwise cut every stream at once); uvicorn waits longer.
            return EventSourceResponse(reply.chunks(events, req.include_usage), ping=15, sep="\n",
                                       shutdown_grace_period=SHUTDOWN_GRACE_S)
        return await reply.whole(events, request)

    return app


def state_shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; try again when it is back", "server_error",
                    code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})


def generation_error(exc: BaseException) -> ApiError:
    """What a client hears when its answer failed in the scheduler."""
    if isinstance(exc, ShuttingDown):
        return state_shutting_down()
    return ApiError(500, f"generation failed: {exc}", "server_error")


class Reply:
    """One job's events turned into OpenAI's answer: a whole `chat.completion` or its stream of chunks."""

    def __init__(self, job: Job, text: StreamText, model_id: str):
        self.job, self.text, self.model_id = job, text, model_id
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def finish_reason(self, result: Result) -> str:
        return "stop" if self.text.stopped or result.finish_reason == "stop" else "length"

    async def whole(self, events: asyncio.Queue, request: Request):
        parts: list[str] = []
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    kind, value = "", None
                if loop.time() - checked >= DISCONNECT_CHECK_S:
                    # Nothing cancels a plain handler when its client goes away: look, and stop the
                    # answer nobody will read (it holds a sequence others may be waiting for).
                    checked = loop.time()
                    if await request.is_disconnected():
                        self.job.cancel()
                        return Response(status_code=499)
                if kind == "piece":
                    parts.append(self.text.feed(value))
                    if self.text.stopped:
                        self.job.cancel()
                elif kind == "done":
                    parts.append(self.text.finish())
                    result: Result = value
                    break
                elif kind == "error":
                    raise generation_error(value)
        except asyncio.CancelledError:  # the client went away, or the server stops: free the sequence
            self.job.cancel()
            raise
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "finish_reason": self.finish_reason(result)}],
                "usage": _usage(result), "huatuo": _extension(result)}

    def chunk(self, delta: dict, reason: str | None = None) -> str:
        return json.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]},
                          ensure_ascii=False)

    async def chunks(self, events: asyncio.Queue, include_usage: bool):
        done = False
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await events.get()
                if kind == "piece":
                    out = self.text.feed(value)
                    if out:
                        yield self.chunk({"content": out})
                    if self.text.stopped:
                        self.job.cancel()
                elif kind == "done":
                    done = True
                    tail = self.text.finish()
                    if tail:
                        yield self.chunk({"content": tail})
                    yield self.chunk({}, self.finish_reason(value))
                    if include_usage:
                        yield json.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                          "model": self.model_id, "choices": [], "usage": _usage(value),
                                          "huatuo": _extension(value)})
                    yield "[DONE]"
                    return
                elif kind == "error":
                    done = True
                    yield json.dumps(generation_error(value).body())
                    yield "[DONE]"
                    return
        finally:
            if not done:  # the client went away: free its sequence at once
                self.job.cancel()


class _Server:
    """uvicorn's server, told when shutdown begins: queued answers hear 503 at once, answers in flight get
    SHUTDOWN_GRACE_S to finish and are then ended with an error event (never cut without a word)."""

    def __init__(self, app: FastAPI, config):
        import uvicorn

        state: _State = app.state.huatuo

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if not state.shutting_down:
                    state.shutting_down = True
                    if state.scheduler is not None:
                        state.scheduler.shut_down(SHUTDOWN_GRACE_S)
                super().handle_exit(sig, frame)

        self.server = Server(config)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or one line: a busy or impossible port fails here, before anything loads."""
    if not 0 <= port <= 65535:
        raise HuatuoError(f"--port {port}: give a port between 1 and 65535 (0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise HuatuoError(f"port {port} is in use on {host}; pick another --port (or --port 0 for a free one)") \
                from None
        raise HuatuoError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); check --host and --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: ServeConfig, open_browser: bool = False) -> None:
    import ipaddress

    import uvicorn

    sock = bind(config.host, config.port)
    port = sock.getsockname()[1]
    loopback = config.host in ("localhost",) or _is_loopback(config.host, ipaddress)
    if not loopback and not config.api_keys:
        print(f"WARNING: listening on {config.host} without an API key: anyone who can reach this address can "
              "use the model and send it images. Give --api-key-file or HUATUO_LOCAL_API_KEY, or keep --host "
              "127.0.0.1.", file=sys.stderr, flush=True)
    shown = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"huatuo-local serve: http://{shown}:{port}/v1 (OpenAI API), page http://{shown}:{port}/ ; loading "
          f"{config.model or 'the default model'}...", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def stopped(sig, frame):  # uvicorn re-raises the signal once its graceful shutdown is done
        print("huatuo-local serve: stopped", file=sys.stderr, flush=True)
        raise SystemExit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopped)
    if open_browser:
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(f"http://{shown}:{port}/",)).start()
    config.port = port
    app = create_app(config)
    guarded = LocalGuard(app, config.host, port, config.cors_origins)
    settings = uvicorn.Config(guarded, log_level="warning", timeout_graceful_shutdown=10, access_log=False)
    _Server(app, settings).server.run(sockets=[sock])


def _is_loopback(host: str, ipaddress) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
