"""`huatuo-local serve`'s application: an OpenAI-compatible API and a page over the one scheduler.

The routes (chat.py, preview.py, status.py, page.py) only check, translate (openai.py), submit a
job and stream its events; every error leaves in OpenAI's shape from the handlers here. The model
loads in the background (state.py): /health answers 503 until it is ready. What runs the app and
what guards it: server.py and guard.py.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from huatuo_local.runtime.serve import chat, page, preview, status
from huatuo_local.runtime.serve.errors import ApiError
from huatuo_local.runtime.serve.state import ServeConfig, ServerState
from starlette.exceptions import HTTPException

log = logging.getLogger("huatuo_local.serve")


def create_app(config: ServeConfig) -> FastAPI:
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="huatuo-load", daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="huatuo-local", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.huatuo = state
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    for module in (page, status, preview, chat):
        app.include_router(module.router)
    _errors_in_openais_shape(app)
    return app


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _errors_in_openais_shape(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return _error_response(ApiError(exc.status_code, message, kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return _error_response(ApiError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # never a traceback to a client
        log.exception("unexpected error")
        return _error_response(ApiError(500, f"internal error ({type(exc).__name__})", "server_error"))
