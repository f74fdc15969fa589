"""One job's events turned into OpenAI's answer: a whole `chat.completion`, or its stream of chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import Response
from huatuo_local.runtime.cluster.wire import ReplicaLost
from huatuo_local.runtime.core.events import Done, Failed, Piece
from huatuo_local.runtime.core.record import fingerprint
from huatuo_local.runtime.core.sampling import NonFiniteScores
from huatuo_local.runtime.core.scheduler import Result, ShuttingDown
from huatuo_local.runtime.serve.backend import Answering
from huatuo_local.runtime.serve.body import DISCONNECT_CHECK_S
from huatuo_local.runtime.serve.errors import ApiError
from huatuo_local.runtime.serve.state import RETRY_AFTER_S


class StreamText:
    """The answer as the release returns it: stripped. Leading whitespace is dropped and trailing whitespace
    held back until the next piece shows whether more text follows. (Stop strings are the scheduler's:
    runtime/core/stops.py.)"""

    def __init__(self):
        self.buf, self.started = "", False

    def feed(self, piece: str) -> str:
        self.buf += piece
        if not self.started:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return ""
            self.started = True
        cut = len(self.buf.rstrip())
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def finish(self) -> str:
        self.buf = ""
        return ""


def logprobs_json(entries) -> dict:
    """OpenAI's `logprobs` of a choice: one entry per answer token (runtime/core/sampling.py TokenLogprob)."""
    return {"content": [{"token": e.text, "logprob": e.logprob, "bytes": list(e.bytes),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in e.top]}
                        for e in entries], "refusal": None}


def _usage(result: Result) -> dict:
    # cached_tokens: prompt positions not computed again (held by the sequence, or read from the prefix cache).
    return {"prompt_tokens": result.prompt_positions, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_positions + len(result.tokens),
            "prompt_tokens_details": {"cached_tokens": result.counters.tokens_reused}}


def _extension(result: Result, replica: dict | None = None) -> dict:
    """Beyond OpenAI's fields: what the scheduler reused, how long things took, and on a cluster which replica
    answered (runtime/cluster/)."""
    return {**({"replica": replica} if replica else {}), **result.counters.__dict__,
            "first_token_s": round(result.timings.first_token_s, 4),
            "queued_s": round(result.timings.queued_s, 4), "generation_s": round(result.timings.generation_s, 4)}


def state_shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; try again when it is back", "server_error",
                    code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})


def generation_error(exc: BaseException) -> ApiError:
    """What a client hears when its answer failed in the scheduler."""
    if isinstance(exc, ShuttingDown):
        return state_shutting_down()
    if isinstance(exc, ReplicaLost):  # a cluster's replica died mid-answer; the others answer a retry
        return ApiError(503, str(exc), "server_error", code="replica_lost", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, NonFiniteScores):  # the model file's fault, said as such; the server stays up
        return ApiError(500, str(exc), "server_error", code="model_output_invalid")
    return ApiError(500, f"generation failed: {exc}", "server_error")


class Reply:
    """One job's events turned into OpenAI's answer: a whole `chat.completion` or its stream of chunks."""

    def __init__(self, job: Answering, text: StreamText, model_id: str, record: dict | None = None):
        self.job, self.text, self.model_id, self.record = job, text, model_id, record
        # OpenAI's system_fingerprint: which model files and engine build answered (core/record.py).
        self.fingerprint = fingerprint(record) if record else None
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.replica = getattr(job, "replica", None)  # a cluster's answer: which replica (runtime/cluster/)
        self.created = int(time.time())

    def finish_reason(self, result: Result) -> str:
        return "stop" if result.finish_reason == "stop" else "length"

    async def whole(self, events: asyncio.Queue, request: Request):
        parts: list[str] = []
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    event = None
                if loop.time() - checked >= DISCONNECT_CHECK_S:
                    # Nothing cancels a plain handler when its client goes away: look, and stop the
                    # answer nobody will read (it holds a sequence others may be waiting for).
                    checked = loop.time()
                    if await request.is_disconnected():
                        self.job.cancel()
                        return Response(status_code=499)
                if isinstance(event, Piece):
                    parts.append(self.text.feed(event.text))
                elif isinstance(event, Done):
                    result: Result = event.result
                    break
                elif isinstance(event, Failed):
                    raise generation_error(event.error)
        except asyncio.CancelledError:  # the client went away, or the server stops: free the sequence
            self.job.cancel()
            raise
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                  "finish_reason": self.finish_reason(result),
                  "logprobs": logprobs_json(result.logprobs) if result.logprobs is not None else None}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "system_fingerprint": self.fingerprint, "choices": [choice], "usage": _usage(result),
                "huatuo": _extension(result, self.replica), "huatuo_record": self.record}

    def chunk(self, delta: dict, reason: str | None = None, logprobs: tuple = ()) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        if logprobs:
            choice["logprobs"] = logprobs_json(logprobs)
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
               "system_fingerprint": self.fingerprint, "choices": [choice]}
        if reason is not None:  # the answer's record travels with its last chunk
            out["huatuo_record"] = self.record
        return json.dumps(out, ensure_ascii=False)

    async def chunks(self, events: asyncio.Queue, include_usage: bool):
        done = False
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if isinstance(event, Piece):
                    out = self.text.feed(event.text)
                    if out or event.logprobs:
                        yield self.chunk({"content": out}, logprobs=event.logprobs)
                elif isinstance(event, Done):
                    done = True
                    yield self.chunk({}, self.finish_reason(event.result))
                    if include_usage:
                        yield json.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                          "model": self.model_id, "system_fingerprint": self.fingerprint,
                                          "choices": [], "usage": _usage(event.result),
                                          "huatuo": _extension(event.result, self.replica)})
                    yield "[DONE]"
                    return
                elif isinstance(event, Failed):
                    done = True
                    yield json.dumps(generation_error(event.error).body())
                    yield "[DONE]"
                    return
        finally:
            if not done:  # the client went away: free its sequence at once
                self.job.cancel()


