"""Keeps `serve --rpc` up when an RPC worker dies: llama.cpp aborts the process holding the model then.

The command runs the real server as a child process and starts it again when it ended that way
(exit status 3, written by `rpc.install_abort_message`). The new server reports the lost worker on
/health (503) and loads the model again as soon as the workers answer (`server._State.load`).
Answers in flight when the worker died are lost; clients see their connection close.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

CHILD_ENV = "HUATUO_LOCAL_SERVE_CHILD"
WORKER_DIED = 3  # rpc.install_abort_message's exit status
RESTART_DELAY_S = 1.0


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def _pinned_port(args: list[str], host: str, port: int) -> list[str]:
    """With `--port 0`, every restarted child must listen where the first one did: pick the port here."""
    if port != 0:
        return args
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        chosen = s.getsockname()[1]
    out, i = [], 0
    while i < len(args):
        if args[i] == "--port" and i + 1 < len(args):
            out += ["--port", str(chosen)]
            i += 2
        elif args[i].startswith("--port="):
            out.append(f"--port={chosen}")
            i += 1
        else:
            out.append(args[i])
            i += 1
    return out


def supervise(args: list[str], host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run `huatuo-local ARGS` as a child until it ends for another reason than a dead worker."""
    args = _pinned_port(args, host, port)
    env = dict(os.environ, **{CHILD_ENV: "1"})
    child: subprocess.Popen | None = None

    def forward(signum, _frame) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    # Ctrl-C reaches the child from the terminal too; SIGTERM (systemd, docker stop) is passed on.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGTERM, forward)
    while True:
        child = subprocess.Popen([sys.executable, "-m", "huatuo_local", *args], env=env)
        code = child.wait()
        if code != WORKER_DIED:
            return code
        print("huatuo-local serve: an RPC worker stopped answering; starting the server again (answers in flight "
              "were lost); it loads the model as soon as the workers answer", file=sys.stderr, flush=True)
        time.sleep(RESTART_DELAY_S)
