"""`huatuo-local serve`: an OpenAI-compatible HTTP server on the one scheduler.

The routes only validate, translate (runtime/openai_api.py), submit a job to the scheduler
and stream its events; every error leaves in OpenAI's shape from one place. The model loads
in the background: /health answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import signal
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
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .items import conversation_items
from .openai_api import ApiError, ChatRequest, ImageLoader, Limits, parse_chat
from .scheduler import ContextFull, Job, QueueFull, Result, Scheduler

log = logging.getLogger("huatuo_local.serve")
RETRY_AFTER_S = 2
SHUTDOWN_GRACE_S = 8.0  # < uvicorn's timeout_graceful_shutdown (10 s) below


@dataclass
class ServeConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    parallel: int = 4
    api_key: str | None = None
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

    def load(self) -> None:
        from .api import open_model

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
        print(f"ready: {self.model_id} ({c.parallel} parallel, {engine.options.n_ctx} tokens of context each)",
              file=sys.stderr, flush=True)

    def ready(self) -> Scheduler:
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


def create_app(config: ServeConfig) -> FastAPI:
    state = _State(config)

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

    def check_key(request: Request) -> None:
        if not config.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name not in state.names:
            raise ApiError(404, f"model {name!r} is not served here (this server serves {state.model_id})",
                           "not_found_error", "model", "model_not_found")

    async def read_json(request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"request body larger than {config.max_body_bytes // (1024 * 1024)} MB",
                           code="body_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > config.max_body_bytes:
                raise ApiError(413, f"request body larger than {config.max_body_bytes // (1024 * 1024)} MB",
                               code="body_too_large")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None

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
            raise ApiError(404, f"no file {name}", "not_found_error")
        return FileResponse(web / name, media_type=files[name], headers={"Cache-Control": "no-store"})

    @app.post("/v1/huatuo/preview")
    async def preview(request: Request):
        """The exact picture the model receives for one image (window, frame, pad, 336 px), as PNG."""
        check_key(request)
        state.ready()
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("image_url"), dict):
            raise ApiError(400, "send {\"image_url\": {\"url\": \"data:...\", \"window\": ..., \"frame\": ...}}",
                           param="image_url")
        assert state.loader is not None
        item, frames = await run_in_threadpool(state.loader.preview, body["image_url"])
        buf = io.BytesIO()
        item.picture.save(buf, format="PNG")
        return {"png": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "frames": frames,
                "width": item.picture.size[0], "height": item.picture.size[1], "digest": item.digest}

    @app.get("/health")
    async def health():
        if state.scheduler is not None:
            return {"status": "ok", "model": state.model_id, "quant": state.quant, "auth": bool(config.api_key),
                    "active": state.scheduler.active(), "queued": state.scheduler.queued()}
        status = "error" if state.error else "loading"
        return JSONResponse({"status": status, "error": state.error}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        state.ready()
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                            "owned_by": "huatuo-local"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request)
        state.ready()
        check_model(name)
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "huatuo-local"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        scheduler = state.ready()
        body = await read_json(request)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            check_model(body["model"])
        assert state.loader is not None
        req: ChatRequest = await run_in_threadpool(parse_chat, body, state.loader)
        engine = scheduler.engine
        items = await run_in_threadpool(conversation_items, engine.tokenize, req.turns, req.images)
        if config.log_prompts:
            log.info("prompt: %s", json.dumps([t.text for t in req.turns], ensure_ascii=False))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(items, req.params, np.random.default_rng(req.seed),
                  on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            scheduler.submit(job)
        except ContextFull as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except QueueFull as exc:
            raise ApiError(503, f"the server is busy ({exc})", "server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        text = StreamText(req.stop)

        def finish_reason(result: Result) -> str:
            return "stop" if text.stopped or result.finish_reason == "stop" else "length"

        if not req.stream:
            parts: list[str] = []
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
                            job.cancel()
                            return Response(status_code=499)
                    if not kind:
                        continue
                    if kind == "piece":
                        parts.append(text.feed(value))
                        if text.stopped:
                            job.cancel()
                    elif kind == "done":
                        parts.append(text.finish())
                        result: Result = value
                        break
                    else:
                        raise value
            except asyncio.CancelledError:  # the client went away
                job.cancel()
                raise
            except ApiError:
                raise
            except Exception as exc:
                raise ApiError(500, f"generation failed: {exc}", "server_error") from None
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": state.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                 "finish_reason": finish_reason(result)}],
                    "usage": _usage(result), "huatuo": _extension(result)}

        def chunk(delta: dict, reason: str | None = None) -> str:
            return json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                               "model": state.model_id,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]},
                              ensure_ascii=False)

        async def stream():
            done = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await events.get()
                    if kind == "piece":
                        out = text.feed(value)
                        if out:
                            yield chunk({"content": out})
                        if text.stopped:
                            job.cancel()
                    elif kind == "done":
                        done = True
                        tail = text.finish()
                        if tail:
                            yield chunk({"content": tail})
                        yield chunk({}, finish_reason(value))
                        if req.include_usage:
                            yield json.dumps({"id": completion_id, "object": "chat.completion.chunk",
                                              "created": created, "model": state.model_id, "choices": [],
                                              "usage": _usage(value), "huatuo": _extension(value)})
                        yield "[DONE]"
                        return
                    else:
                        done = True
                        yield json.dumps(ApiError(500, f"generation failed: {value}", "server_error").body())
                        yield "[DONE]"
                        return
            finally:
                if not done:  # the client went away: free its sequence at once
                    job.cancel()

        # On SIGTERM, answers in flight get SHUTDOWN_GRACE_S to finish with their last chunk and
        # [DONE] (sse-starlette would otherwise cut every stream at once); uvicorn waits longer.
        return EventSourceResponse(stream(), ping=15, sep="\n", shutdown_grace_period=SHUTDOWN_GRACE_S)

    return app


def serve(config: ServeConfig, open_browser: bool = False) -> None:
    import ipaddress

    import uvicorn

    loopback = config.host in ("localhost",) or _is_loopback(config.host, ipaddress)
    if not loopback and not config.api_key:
        print(f"WARNING: listening on {config.host} without an API key: anyone who can reach this address can "
              "use the model and send it images. Give --api-key or --api-key-file, or keep --host 127.0.0.1.",
              file=sys.stderr, flush=True)
    print(f"huatuo-local serve: http://{config.host}:{config.port}/v1 (OpenAI API), loading "
          f"{config.model or 'the default model'}...", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def stopped(sig, frame):  # uvicorn re-raises the signal once its graceful shutdown is done
        print("huatuo-local serve: stopped", file=sys.stderr, flush=True)
        raise SystemExit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopped)
    if open_browser:
        import webbrowser

        host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
        threading.Timer(1.0, webbrowser.open, args=(f"http://{host}:{config.port}/",)).start()
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=10, access_log=False)


def _is_loopback(host: str, ipaddress) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
