"""POST /v1/huatuo/preview: the exact picture the model receives for one image, for the page."""

from __future__ import annotations

import base64
import io
from dataclasses import asdict

from fastapi import APIRouter, Request
from huatuo_local.runtime.serve.body import Disconnect, read_json
from huatuo_local.runtime.serve.errors import ApiError
from huatuo_local.runtime.serve.state import state_of

router = APIRouter()


@router.post("/v1/huatuo/preview")
async def preview(request: Request):
    """The picture (window, frame, padded to square, 336 px) as PNG, with its digest and frame count."""
    state = state_of(request)
    state.tenant(request)
    state.ready()
    body = await read_json(request, state.config.max_body_bytes)
    if not isinstance(body, dict) or not isinstance(body.get("image_url"), dict):
        raise ApiError(400, "send {\"image_url\": {\"url\": \"data:...\", \"window\": ..., \"frame\": ...}}",
                       param="image_url")
    assert state.loader is not None
    watch = Disconnect(request)
    shown = await watch.run(state.loader.preview, body["image_url"], watch.gone.is_set)
    item = shown.item
    buf = io.BytesIO()
    item.picture.save(buf, format="PNG")
    return {"png": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "frames": shown.frames,
            "width": item.picture.size[0], "height": item.picture.size[1], "digest": item.digest,
            "window": asdict(shown.window) if shown.window else None,
            # A study's picture: its series, the slices chosen and how many the series has (the page's scrubber).
            "study": item.source if item.source and item.source.get("study") else None}
