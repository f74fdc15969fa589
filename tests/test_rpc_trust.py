"""Issue 36: a hostile or stalled RPC worker cannot take the client down, and a worker with a key serves only
the holders of that key. Workers are real `rpc-worker` processes or stand-ins (tests/hostile.py) on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time

import hostile
import pytest
from conftest import CLI, ROOT, run_cli
from test_rpc import QUESTION, free_port, images  # noqa: F401  (a fixture)
from tiny_models import TinySpec

SPEC = TinySpec(arch="qwen2", seed=15, layers=4, tower="folder")


@pytest.fixture(scope="module")
def model(converted):
    return converted(SPEC, "F32", "f32")


def chat(model, images, *extra, env=None, timeout=120):  # noqa: F811  (images: the fixture's value)
    return run_cli("chat", "--model", str(model.manifest_path), "--temperature", "0", "--no-prefix-cache",
                   "--max-tokens", "8", "--json", *images, "-p", QUESTION, *extra, env=env, timeout=timeout)


@pytest.mark.parametrize("kind,said", [
    ("devices-4294967295", "claims 4294967295 devices (a machine lends 1 to 16); not a worker to trust"),
    ("devices-17", "claims 17 devices (a machine lends 1 to 16)"),
    ("garbage", "answered 5 bytes where the protocol has 28"),
])
def test_a_worker_that_lies_at_the_probe_is_one_line_before_loading(model, images, kind, said):  # noqa: F811
    worker = hostile.HostileWorker(kind)
    try:
        proc = chat(model, images, "--rpc", worker.endpoint)
    finally:
        worker.close()
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: RPC worker {worker.endpoint}") \
        and said in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind,said", [
    ("lies-later", "claims 4294967295 devices (a machine lends 1 to 16); not a worker to trust"),
    ("stall", "no answer for 3 s (HUATUO_LOCAL_RPC_TIMEOUT); it stalled or the network is down"),
    # Unasked bytes are seen as such, or, when llama.cpp has asked its next question meanwhile, as an answer
    # of the wrong length: the connection ends either way.
    ("unasked", r"(sent bytes nobody asked for|answered 72340172838076673 bytes where the protocol has \d+)"),
])
def test_a_worker_that_turns_after_the_probe_ends_the_run_in_one_line(model, images, kind, said):  # noqa: F811
    """What llama.cpp itself would trust (it allocated 4294967295 devices, or waited forever) is cut by the
    relay; llama.cpp then aborts, and the one line says why."""
    worker = hostile.HostileWorker(kind)
    t0 = time.monotonic()
    try:
        proc = chat(model, images, "--rpc", worker.endpoint, env={"HUATUO_LOCAL_RPC_TIMEOUT": "3"})
    finally:
        worker.close()
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert re.fullmatch(rf"error: RPC worker {worker.endpoint}: {said if kind == 'unasked' else re.escape(said)}.*; "
                        "restart the worker and ask again", proc.stderr.strip()), proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60


def test_ctrl_c_while_a_worker_stalls_ends_within_seconds(model, images):  # noqa: F811
    worker = hostile.HostileWorker("stall")
    proc = subprocess.Popen([*CLI, "chat", "--model", str(model.manifest_path), "--no-prefix-cache", *images, "-p",
                             QUESTION, "--rpc", worker.endpoint], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while worker.connections < 2:  # the probe's, then llama.cpp's own, now waiting on the stalled worker
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        worker.close()
    assert proc.returncode == 130 and err.strip() == "interrupted", err[-2000:]  # no gdb backtrace, no SIGABRT
    assert waited < 20, waited


def start_worker(*args: str) -> tuple[subprocess.Popen, str]:
    """A worker process and its endpoint, once it says it listens (that line kept as `proc.said`)."""
    proc = subprocess.Popen([*CLI, "rpc-worker", "--threads", "1", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    while not (found := re.search(r"listening on (\S+), protocol", lines[-1] if lines else "")):
        lines.append(proc.stdout.readline())
        assert lines[-1] and len(lines) < 50, "".join(lines)
    proc.said = lines[-1]
    return proc, found.group(1)


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


def test_a_worker_with_a_key_serves_its_holders_only(model, images, tmp_path):  # noqa: F811
    """TLS with one key file on both sides; without it, or with another, nothing reaches llama.cpp; an idle
    connection (any local user can open one) no longer locks the owner out; answers are the local ones."""
    key, other = tmp_path / "rpc.key", tmp_path / "other.key"
    made = run_cli("rpc-worker", "--init-key", str(key))
    assert made.returncode == 0 and f"wrote {key}" in made.stdout, made.stderr
    assert key.stat().st_mode & 0o777 == 0o600 and "BEGIN CERTIFICATE" in key.read_text()
    again = run_cli("rpc-worker", "--init-key", str(key))
    assert again.returncode == 1 and "exists already" in again.stderr
    run_cli("rpc-worker", "--init-key", str(other))
    local = json.loads(chat(model, images).stdout)["answer"]
    worker, endpoint = start_worker("--port", "0", "--key-file", str(key))
    try:
        idle = socket.create_connection(tuple(endpoint.rsplit(":", 1)[0:1]) + (int(endpoint.rsplit(":", 1)[1]),))
        keyed = chat(model, images, "--rpc", endpoint, "--rpc-key-file", str(key))
        assert keyed.returncode == 0, keyed.stderr[-2000:]
        assert json.loads(keyed.stdout)["answer"] == local  # the same greedy answer through TLS
        idle.close()
        bare = chat(model, images, "--rpc", endpoint)
        assert bare.returncode == 1 and bare.stderr.startswith(f"error: RPC worker {endpoint}: ") \
            and "(--rpc-key-file)" in bare.stderr and bare.stderr.count("\n") == 1, bare.stderr
        wrong = chat(model, images, "--rpc", endpoint, "--rpc-key-file", str(other))
        assert wrong.returncode == 1 and "the secure connection failed" in wrong.stderr, wrong.stderr
        key.chmod(0o644)
        loose = chat(model, images, "--rpc", endpoint, "--rpc-key-file", str(key))
        assert loose.returncode == 1 and "readable by other users" in loose.stderr, loose.stderr
        key.chmod(0o600)
    finally:
        stop(worker)
    assert "TLS with the key" in worker.said


def test_a_worker_restarts_on_its_port_at_once_and_takes_loopback_names(tmp_path):
    port = free_port()
    worker, endpoint = start_worker("--port", str(port))
    deadline = time.time() + 30
    while True:  # llama.cpp's own server starts listening just after the worker's line
        try:
            client = socket.create_connection(("127.0.0.1", port))  # connected when the worker stops
            break
        except ConnectionRefusedError:
            assert time.time() < deadline
            time.sleep(0.1)
    time.sleep(0.5)
    stop(worker)
    client.close()
    again, _ = start_worker("--port", str(port))  # bound at once (SO_REUSEADDR), not ~70 s later
    stop(again)
    named, endpoint = start_worker("--port", "0", "--host", "localhost")
    stop(named)
    assert endpoint.startswith("localhost:")
    six = run_cli("rpc-worker", "--port", "0", "--host", "::1")
    assert six.returncode == 1 and six.stderr.strip().startswith("error: rpc-worker --host ::1: llama.cpp's RPC "
                                                                 "server listens on IPv4 only"), six.stderr
    key = tmp_path / "k"
    run_cli("rpc-worker", "--init-key", str(key))
    if socket.has_ipv6:
        v6, endpoint = start_worker("--port", "0", "--host", "::1", "--key-file", str(key))
        stop(v6)
        assert endpoint.startswith("[::1]:")


def test_serve_says_on_health_why_a_stalled_worker_ended_it(model, tmp_path):
    """serve --rpc stayed at {"status": "loading"} forever behind a worker that stalled after the probe. The
    relay's deadline ends the load; the server starts again and /health says why, in OpenAI's error shape's
    words, while it tries again."""
    import httpx
    from test_serve import server

    worker = hostile.HostileWorker("stall")
    try:
        with server(str(model.manifest_path), tmp_path, "--rpc", worker.endpoint, wait=False,
                    env={"HUATUO_LOCAL_RPC_TIMEOUT": "2"}) as (url, proc, log):
            deadline = time.time() + 90
            while True:
                try:
                    health = httpx.get(f"{url}/health", timeout=5)
                    if health.status_code == 503 and health.json().get("error"):
                        break
                except httpx.HTTPError:
                    pass  # between two servers
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.3)
            assert health.json()["status"] == "error"
            assert f"RPC worker {worker.endpoint}: no answer for 2 s" in health.json()["error"], health.json()
    finally:
        worker.close()


def test_the_relay_carries_this_process_s_connections_only():
    """The relay (llama.cpp's way to a worker, with the key) listens on loopback: another program of this
    machine, another user's say, connecting to it is closed before a byte reaches the worker."""
    import sys

    from huatuo_local.runtime.rpc.relay import Relay

    worker = hostile.HostileWorker("stall")
    relay = None
    try:
        relay = Relay(worker.endpoint, None)
        host, port = relay.local.split(":")
        other = subprocess.run([sys.executable, "-c", (
            "import socket, sys\n"
            f"s = socket.create_connection(('{host}', {port}))\n"
            "s.sendall(bytes([14]) + (24).to_bytes(8, 'little') + bytes(24))\n"
            "s.settimeout(10)\n"
            "try:\n"
            "    print('closed' if s.recv(1) == b'' else 'answered')\n"
            "except ConnectionResetError:\n"
            "    print('closed')\n")], capture_output=True, text=True, timeout=60)
        assert other.stdout.strip() == "closed", other.stdout + other.stderr
        assert worker.connections == 0
        mine = socket.create_connection((host, int(port)))  # this process: carried to the worker
        deadline = time.time() + 10
        while worker.connections == 0:
            assert time.time() < deadline
            time.sleep(0.05)
        mine.close()
    finally:
        if relay is not None:
            relay.close()
        worker.close()
