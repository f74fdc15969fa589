"""Request bodies: read within the size limit, counted as they arrive, parsed off the event loop.

A body's JSON values are bounded before anything is parsed (60 MB of `{}` would be tens of millions
of Python objects), text must be valid Unicode, and work done for a request in a thread can ask
whether its client is still there (`Disconnect`).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading

from fastapi import Request
from huatuo_local.runtime.serve.errors import ApiError
from starlette.concurrency import run_in_threadpool

DISCONNECT_CHECK_S = 1.0  # how often a non-streaming request checks that its client is still there
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


_PARSING = asyncio.Semaphore(2)  # large bodies parsed at once (memory), off the event loop


async def read_json(request: Request, max_bytes: int) -> object:
    """The request's JSON body; 413 (closing the connection) past `max_bytes` or MAX_JSON_VALUES."""
    too_large = ApiError(413, f"request body larger than {max_bytes // (1024 * 1024)} MB",
                         code="body_too_large", headers={"Connection": "close"})
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    raw = bytearray()
    values = 0
    async for chunk in request.stream():
        raw += chunk
        values += json_values(chunk)
        if len(raw) > max_bytes:
            raise too_large
        if values > MAX_JSON_VALUES:  # refused as it arrives, before the rest is read or anything parsed
            raise ApiError(413, f"the request holds more than {MAX_JSON_VALUES} JSON values",
                           code="body_too_complex", headers={"Connection": "close"})
    if len(raw) < 65536:
        return parse_body(bytes(raw))
    async with _PARSING:
        return await run_in_threadpool(parse_body, bytes(raw))
