"""Issue 15: a model split over llama.cpp RPC workers answers exactly as it does locally.

The workers are `huatuo-local rpc-worker` subprocesses on 127.0.0.1; the client is `chat`, run as a
user would. Workers on one machine measure nothing about speed (see bench/rpc.py); they prove the
placement, the registration and the failure paths.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
from conftest import CLI, ROOT, run_cli
from tiny_models import TinySpec

QUESTION = "What does the picture show?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    def __init__(self, n: int):
        self.procs, self.ports = [], []
        for _ in range(n):
            port = free_port()
            proc = subprocess.Popen([*CLI, "rpc-worker", "--port", str(port), "--threads", "1"], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.procs.append(proc)
            self.ports.append(port)
        for proc in self.procs:
            line = proc.stdout.readline()
            assert "listening on 127.0.0.1:" in line and "protocol" in line, line

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            out, _ = proc.communicate(timeout=10)
            assert proc.returncode == 0 or proc.returncode < 0, out
            if proc.returncode == 0:
                assert "stopped" in out


@pytest.fixture
def workers():
    w = Workers(2)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("rpc-images")
    path = folder / "scan.png"
    Image.fromarray((np.random.default_rng(7).random((120, 90, 3)) * 255).astype(np.uint8)).save(path)
    return [str(path)]


def ask(model, images, *extra):
    proc = run_cli("chat", "--model", str(model.manifest_path), "--temperature", "0", "--no-prefix-cache",
                   "--max-tokens", "12", "--json", *images, "-p", QUESTION, *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["answer"]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_split_over_two_workers_gives_the_local_answer(converted, images, workers, arch):
    model = converted(TinySpec(arch=arch, seed=15, layers=4, tower="folder"), "F32", "f32")
    local = ask(model, images)
    assert ask(model, images, "--rpc", workers.endpoints) == local  # split by free memory
    assert ask(model, images, "--rpc", workers.endpoints, "--tensor-split", "0,1,1") == local  # all on the workers
    assert ask(model, images, "--rpc", workers.endpoints, "--tensor-split", "2,1,1") == local


def test_the_engine_really_places_layers_on_the_workers(converted, workers):
    from huatuo_local.runtime.engine import Engine, EngineOptions

    model = converted(TinySpec(arch="qwen2", seed=15, layers=4, tower="folder"), "F32", "f32")
    eng = Engine(model.llm_path, model.mmproj_path,
                 EngineOptions(n_ctx=512, rpc=tuple(workers.endpoints.split(",")), tensor_split=(1.0, 1.0, 2.0)))
    try:
        assert eng.rpc_layers == 3 and [w.endpoint for w in eng.workers] == workers.endpoints.split(",")
    finally:
        eng.close()


def test_an_unreachable_worker_is_one_line_before_loading(converted, images):
    model = converted(TinySpec(arch="qwen2", seed=15, layers=4, tower="folder"), "F32", "f32")
    port = free_port()
    t0 = time.monotonic()
    proc = run_cli("chat", "--model", str(model.manifest_path), *images, "-p", QUESTION, "--rpc",
                   f"127.0.0.1:{port}", timeout=120)
    assert proc.returncode == 1 and f"RPC worker 127.0.0.1:{port}: unreachable" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert time.monotonic() - t0 < 30
    bad = run_cli("chat", "--model", str(model.manifest_path), "-p", QUESTION, "--rpc", "nohost")
    assert bad.returncode != 0 and "expected HOST:PORT" in bad.stderr


def test_a_worker_that_dies_mid_answer_is_a_clear_error_in_bounded_time(converted, images, workers):
    model = converted(TinySpec(arch="qwen2", seed=15, layers=4, tower="folder"), "F32", "f32")
    proc = subprocess.Popen([*CLI, "chat", "--model", str(model.manifest_path), "--temperature", "0",
                             "--no-prefix-cache", "--max-tokens", "100000", "--ctx", "60000", *images, "-p", QUESTION,
                             "--rpc", workers.endpoints, "--tensor-split", "0,1,1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    first = proc.stdout.read(1)  # the answer has started
    assert first, proc.stderr.read()
    workers.procs[1].kill()
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 3 and "an RPC worker stopped answering" in err, err[-2000:]


def test_doctor_reports_rpc_and_the_workers_memory(workers):
    proc = run_cli("doctor", "--rpc", workers.endpoints)
    assert "RPC backend      built in" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("RPC worker       127.0.0.1:") == 2
    assert "fits across the workers and this machine" in proc.stdout


def test_a_worker_refuses_a_public_address_without_the_acknowledgement():
    proc = run_cli("rpc-worker", "--host", "0.0.0.0", "--port", str(free_port()))
    assert proc.returncode == 1 and "no authentication or encryption" in proc.stderr and "ssh -N -L" in proc.stderr
    assert "Traceback" not in proc.stderr
