"""POST /v1/chat/completions: check, translate, hand one task to the backend (this process's scheduler or a
cluster's replicas: serve/backend.py), stream its events."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

from fastapi import APIRouter, Request
from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.core.chat_task import BadRequest, ChatTask
from huatuo_local.runtime.core.record import answer_record
from huatuo_local.runtime.core.scheduler import ContextFull, QueueFull, ShuttingDown
from huatuo_local.runtime.serve.body import Disconnect, read_json
from huatuo_local.runtime.serve.errors import ApiError
from huatuo_local.runtime.serve.openai import ChatRequest, parse_chat
from huatuo_local.runtime.serve.reply import Reply, StreamText, generation_error, state_shutting_down
from huatuo_local.runtime.serve.state import RETRY_AFTER_S, SHUTDOWN_GRACE_S, state_of
from sse_starlette.sse import EventSourceResponse

log = logging.getLogger("huatuo_local.serve")
router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = state_of(request)
    who = state.tenant(request) or ""
    backend = state.ready()
    body = await read_json(request, state.config.max_body_bytes)
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        state.check_model(body["model"])
    assert state.loader is not None
    watch = Disconnect(request)
    req: ChatRequest = await watch.run(parse_chat, body, state.loader, watch.gone.is_set)
    if state.config.log_prompts:
        log.info("prompt: %s", json.dumps([t.text for t in req.turns], ensure_ascii=False))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    # Without a seed one is drawn and recorded, so a sampled answer can be asked for again exactly.
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    record = answer_record(state.provenance, req.params, seed, len(req.turns), req.images)
    task = ChatTask(req.turns, req.images, req.params, seed, who)
    try:
        job = await backend.start(task, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    except BadRequest as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
    except ContextFull as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except QueueFull as exc:
        raise ApiError(503, f"the server is busy ({exc})", "server_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ShuttingDown:
        raise state_shutting_down() from None
    except HuatuoError as exc:  # a cluster whose replicas could not take the task (reply.py says which status)
        raise generation_error(exc) from None
    reply = Reply(job, StreamText(), state.model_id, record)
    if req.stream:
        # On SIGTERM, answers in flight get SHUTDOWN_GRACE_S to finish with their last chunk and
        # [DONE] (sse-starlette would otherwise cut every stream at once); uvicorn waits longer.
        return EventSourceResponse(reply.chunks(events, req.include_usage), ping=15, sep="\n",
                                   shutdown_grace_period=SHUTDOWN_GRACE_S)
    return await reply.whole(events, request)
