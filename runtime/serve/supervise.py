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
from pathlib import Path

CHILD_ENV = "HUATUO_LOCAL_SERVE_CHILD"
FAILURE_FILE_ENV = "HUATUO_LOCAL_FAILURE_FILE"  # where a dying child says why (rpc.client's abort handler)
LAST_ERROR_ENV = "HUATUO_LOCAL_SERVE_LAST_ERROR"  # what the next child's /health reports while it loads
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
    import tempfile

    args = _pinned_port(args, host, port)
    said = Path(tempfile.mkdtemp(prefix="huatuo-serve-")) / "failure"  # a private folder (0700)
    env = dict(os.environ, **{CHILD_ENV: "1", FAILURE_FILE_ENV: str(said)})
    current: list[subprocess.Popen] = []

    def forward(signum, _frame) -> None:
        if current and current[-1].poll() is None:
            current[-1].send_signal(signum)

    # Ctrl-C reaches the child from the terminal too; SIGTERM (systemd, docker stop) is passed on.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            current[:] = [subprocess.Popen([sys.executable, "-m", "huatuo_local", *args], env=env)]
            code = current[0].wait()
            if code != WORKER_DIED:
                return code
            try:  # the next server says on /health why the last one ended, until it has loaded again
                env[LAST_ERROR_ENV] = said.read_text(encoding="utf-8").strip()[:500]
            except OSError:
                pass
            print("huatuo-local serve: an RPC worker stopped answering; starting the server again (answers in "
                  "flight were lost); it loads the model as soon as the workers answer", file=sys.stderr, flush=True)
            time.sleep(RESTART_DELAY_S)
    finally:
        said.unlink(missing_ok=True)
        said.parent.rmdir()
