"""What a loopback server must refuse before any route runs: other sites' pages in the user's browser.

A server on 127.0.0.1 is reachable by every web page the user opens. Three rules keep those
pages out, checked here for every request (ASGI middleware, in front of everything else):

- Host: only a loopback name or the address the server was started on (`--host`). A page that
  rebinds its own DNS name to 127.0.0.1 still sends its own name, and gets 421.
- Origin: a browser names the page that sent a request; only this server's own page, and the
  origins given with `--cors-origin`, may use it (403 otherwise). Clients that are not browsers
  (curl, the openai package) send no Origin.
- POST bodies must say `Content-Type: application/json` (415 otherwise): a cross-site form or
  a `text/plain` fetch, which browsers send without asking, never reaches a route.

Every response carries a strict Content-Security-Policy (nothing from elsewhere, no framing),
`X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def host_name(host_header: str) -> str:
    """The name part of a Host header: `127.0.0.1:8000` → `127.0.0.1`, `[::1]:8000` → `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


def allowed_hosts(bind: str) -> frozenset[str] | None:
    """Host names a server bound to `bind` answers to; None when it listens on every address (then the
    user chose to be reachable by name from elsewhere, and the API key is the guard)."""
    bind = bind.strip().lower().strip("[]")
    if bind in ("0.0.0.0", "::", ""):
        return None
    return frozenset({*LOOPBACK_NAMES, bind})


def _error(status: int, message: str, code: str) -> tuple[dict, bytes]:
    kind = "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *SECURITY_HEADERS]}
    return start, body


class LocalGuard:
    """ASGI middleware: Host, Origin and Content-Type rules, and the security headers (see the module)."""

    def __init__(self, app, bind: str, port: int, cors_origins: Iterable[str] = ()):
        self.app = app
        self.hosts = allowed_hosts(bind)
        self.port = port
        self.cors = frozenset(o.rstrip("/").lower() for o in cors_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            start, body = _error(*refusal)
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      *(h for h in SECURITY_HEADERS if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str, str] | None:
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return (421, f"Host {host[:80]!r} is not this server's name; open http://127.0.0.1:{self.port}/ "
                         "(a page that renamed itself to this address is refused)", "misdirected_host")
        origin = headers.get("origin")
        if origin is not None:
            own = f"{scope.get('scheme', 'http')}://{host}".lower()
            if origin.rstrip("/").lower() not in self.cors and origin.lower() != own:
                return (403, f"requests from the web page {origin[:80]!r} are refused; start the server with "
                             "--cors-origin ORIGIN to allow a page", "origin_not_allowed")
        if scope.get("method") == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return (415, "send the request body as JSON with Content-Type: application/json",
                        "unsupported_media_type")
        return None
