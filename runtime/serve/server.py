"""Running the app: the listening socket, uvicorn, and what happens on SIGTERM."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import threading

from fastapi import FastAPI
from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.serve.app import create_app
from huatuo_local.runtime.serve.guard import LocalGuard
from huatuo_local.runtime.serve.state import SHUTDOWN_GRACE_S, ServeConfig, ServerState


class _Server:
    """uvicorn's server, told when shutdown begins: queued answers hear 503 at once, answers in flight get
    SHUTDOWN_GRACE_S to finish and are then ended with an error event (never cut without a word)."""

    def __init__(self, app: FastAPI, config):
        import uvicorn

        state: ServerState = app.state.huatuo

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if not state.shutting_down:
                    state.shutting_down = True
                    if state.backend is not None:
                        state.backend.shut_down(SHUTDOWN_GRACE_S)
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
          f"{config.model.model or 'the default model'}...", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    config.port = port
    app = create_app(config)
    try:
        # --ray: the cluster joined and the replicas deployed, or one line. Before our signal handlers: Ray
        # installs its own on joining, and ours must be the ones uvicorn hands the signal back to.
        app.state.huatuo.prepare()
    except BaseException:
        sock.close()
        raise

    def stopped(sig, frame):  # uvicorn re-raises the signal once its graceful shutdown is done
        print("huatuo-local serve: stopped", file=sys.stderr, flush=True)
        raise SystemExit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopped)
    if open_browser:
        threading.Timer(1.0, _open_page, args=(f"http://{shown}:{port}/",)).start()
    guarded = LocalGuard(app, config.host, port, config.cors_origins)
    settings = uvicorn.Config(guarded, log_level="warning", timeout_graceful_shutdown=10, access_log=False)
    _Server(app, settings).server.run(sockets=[sock])


def _open_page(url: str) -> None:
    """--open: the page in the default browser, or one line saying none could be opened."""
    import webbrowser

    try:
        opened = webbrowser.open(url)
    except Exception:  # a broken $BROWSER entry: said below like any other failure
        opened = False
    if not opened:
        print(f"huatuo-local serve: no browser could be opened here; open {url} yourself", file=sys.stderr,
              flush=True)


def _is_loopback(host: str, ipaddress) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
