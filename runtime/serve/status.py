"""GET /health and /v1/models: whether the server answers, and what it serves."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from huatuo_local.runtime.serve.state import RETRY_AFTER_S, state_of

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state = state_of(request)
    # A cluster answers once one replica runs, and says "ok" once every replica asked for does.
    ok = state.backend is not None and not state.shutting_down and state.backend.complete()
    status = ("ok" if ok else "shutting_down" if state.shutting_down else "error" if state.error
              else "starting replicas" if state.backend is not None else "loading")
    if state.tenant(request, required=False) is None:  # without the key: only whether it can answer
        return JSONResponse({"status": status}, status_code=200 if ok else 503,
                            headers={} if ok else {"Retry-After": str(RETRY_AFTER_S)})
    if state.backend is not None:  # loaded; a cluster may still be starting replicas (or replacing one)
        body = {"status": status, "model": state.model_id, "quant": state.quant, "auth": bool(state.tenants),
                **state.backend.status(), "images_decoded": state.loader.decoded if state.loader else 0}
        return JSONResponse(body, status_code=200 if ok else 503,
                            headers={} if ok else {"Retry-After": str(RETRY_AFTER_S)})
    return JSONResponse({"status": status, "error": state.error}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S)})


def _model_card(state) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "huatuo-local"}


@router.get("/v1/models")
async def models(request: Request):
    state = state_of(request)
    state.tenant(request)
    state.ready()
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{name:path}")
async def model(name: str, request: Request):
    state = state_of(request)
    state.tenant(request)
    state.ready()
    state.check_model(name)
    return _model_card(state)
