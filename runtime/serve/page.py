"""The page at / and its two static files (a fixed list: nothing else on disk can be asked for)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from huatuo_local.runtime.serve.errors import ApiError

router = APIRouter()
WEB = Path(__file__).parent / "web"
FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


@router.get("/")
async def page():
    return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})


@router.get("/favicon.ico")
async def favicon():
    return Response(status_code=204)


@router.get("/static/{name}")
async def static(name: str):
    if name not in FILES:
        raise ApiError(404, f"no file {name[:80]}", "not_found_error")
    return FileResponse(WEB / name, media_type=FILES[name], headers={"Cache-Control": "no-store"})
