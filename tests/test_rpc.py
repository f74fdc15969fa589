"""Issue 15: a model split over llama.cpp RPC workers answers exactly as it does locally.

The workers are `huatuo-local rpc-worker` subprocesses on 127.0.0.1; the client is `chat`, run as a
user would. Workers on one machine measure nothing about speed (see bench/rpc.py); they prove the
placement, the registration and the failure paths.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import CLI, ROOT, run_cli
from tiny_models import TinySpec

QUESTION = "What does the picture show?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_port(proc: subprocess.Popen) -> int:
    """The port of an `rpc-worker` once it says it listens (a GPU backend may print its devices first)."""
    seen: list[str] = []
    while not (found := re.search(r"listening on 127\.0\.0\.1:(\d+), protocol", seen[-1] if seen else "")):
        seen.append(proc.stdout.readline())
        assert seen[-1] and len(seen) < 50, "".join(seen)
    return int(found.group(1))


class Workers:
    """`rpc-worker --port 0` each: the worker picks a free port and prints it (no port guessed here that
    another process could take first); everything started is stopped if one fails to come up."""

    def __init__(self, n: int):
        self.procs, self.ports = [], []
        try:
            for _ in range(n):
                self.procs.append(subprocess.Popen([*CLI, "rpc-worker", "--port", "0", "--threads", "1"], cwd=ROOT,
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for proc in self.procs:
                self.ports.append(listening_port(proc))
        except BaseException:
            for proc in self.procs:
                proc.kill()
            raise

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def stop(self) -> None:
        if not self.procs:
            return
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            out, _ = proc.communicate(timeout=10)
            assert proc.returncode == 0 or proc.returncode < 0, out
            if proc.returncode == 0:
                assert "stopped" in out
        self.procs = []


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


def ask(model, images, *extra, placement: list[str] | None = None):
    """chat's greedy answer; with `placement`, llama.cpp's own log must put layers on those devices."""
    proc = run_cli("chat", "--model", str(model.manifest_path), "--temperature", "0", "--no-prefix-cache",
                   "--max-tokens", "12", "--json", *images, "-p", QUESTION, *extra,
                   env={"HUATUO_LOCAL_VERBOSE": "1"} if placement else None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for device in placement or []:
        assert f"assigned to device {device}," in proc.stderr, (device, proc.stderr[-3000:])
    return json.loads(proc.stdout)["answer"]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_split_over_two_workers_gives_the_local_answer(converted, images, workers, arch):
    model = converted(TinySpec(arch=arch, seed=15, layers=4, tower="folder"), "F32", "f32")
    cpu = ("-ngl", "0")  # this machine's share on its CPU, also where it has a GPU: the same arithmetic as local
    local = ask(model, images, *cpu, placement=["CPU"])
    # by free memory (all three report the same machine: a third each)
    assert ask(model, images, *cpu, "--rpc", workers.endpoints, placement=["CPU", "RPC0", "RPC1"]) == local
    assert ask(model, images, *cpu, "--rpc", workers.endpoints, "--tensor-split", "0,1,1",
               placement=["RPC0", "RPC1"]) == local  # every repeating layer on the workers
    assert ask(model, images, *cpu, "--rpc", workers.endpoints, "--tensor-split", "1,0,1",
               placement=["CPU", "RPC1"]) == local


def local_device() -> str:
    """Where this machine's share of the layers goes: its first GPU (doctor lists the ones llama.cpp uses), or
    the CPU."""
    gpus = json.loads(run_cli("doctor", "--json").stdout)["gpus"]
    return gpus[0]["name"] if gpus else "CPU"


def said_placement(stderr: str, n_layer: int) -> tuple[list[str], list[str]]:
    """(the devices of the layers as chat's one line says them, as llama.cpp's own log assigns them)."""
    note = next(line for line in stderr.splitlines() if line.startswith("split: "))
    said: dict[int, str] = {}
    for a, b, dev in re.findall(r"layers? (\d+)(?:-(\d+))?(?: and the output)? on (RPC\d+|this machine's CPU|\w+)",
                                note):
        for il in range(int(a), int(b or a) + 1):
            said[il] = "CPU" if dev == "this machine's CPU" else dev
    # The model's own load comes before the line (the vision probe may load a model of its own after it).
    logged = dict(re.findall(r"layer +(\d+) assigned to device (\w+),", stderr[: stderr.index(note)]))
    return [said.get(il, "?") for il in range(n_layer)], [logged.get(str(il), "?") for il in range(n_layer)]


@pytest.mark.parametrize("shares, counts", [
    ("1,1,1", (1, 2, 1)),  # 4 layers, a third each: 1.33 here, 2.67 on the workers
    ("0,1,1", (0, 2, 2)),  # every repeating layer on the workers
    ("0,3,1", (0, 3, 1)),
    ("1,0,1", (2, 0, 2)),
    ("1,0,0", (4, 0, 0)),
])
def test_the_line_at_load_says_where_each_layer_went_as_llama_cpp_put_it(converted, images, workers, shares, counts):
    """--tensor-split's shares are of the repeating layers (llama.cpp's own split would also give the output
    a share, though it stays here); the one line at load says the placement, checked against llama.cpp's log.
    On a machine with a GPU this machine's share goes to the GPU, placed after the workers as llama.cpp
    orders them (the last layers and the output run here); on the CPU it is the first layers."""
    here = local_device()
    mine, rpc0, rpc1 = ([here] * counts[0], ["RPC0"] * counts[1], ["RPC1"] * counts[2])
    expected = mine + rpc0 + rpc1 if here == "CPU" else rpc0 + rpc1 + mine
    model = converted(TinySpec(arch="qwen2", seed=15, layers=4, tower="folder"), "F32", "f32")
    proc = run_cli("chat", "--model", str(model.manifest_path), "--temperature", "0", "--no-prefix-cache",
                   "--max-tokens", "2", *images, "-p", QUESTION, "--rpc", workers.endpoints, "--tensor-split", shares,
                   env={"HUATUO_LOCAL_VERBOSE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said, logged = said_placement(proc.stderr, 4)
    assert said == logged == expected, (said, logged)
    # The LM head stays here: no logits on the wire.
    assert re.search(r"the output on " + ("this machine's CPU" if here == "CPU" else here + " "), proc.stderr)


def test_the_split_follows_tensor_split(converted, workers):
    from huatuo_local.runtime.engine.engine import Engine, EngineOptions

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


LONG_ANSWER = """
import sys
from huatuo_local import HuatuoChatbot
bot = HuatuoChatbot(sys.argv[1], temperature=0, max_new_tokens=50000, n_ctx=52000, prefix_cache=False,
                    rpc=sys.argv[3], tensor_split=[0, 1, 1])
bot.sampling.min_new_tokens = 50000  # a tiny random model would otherwise stop at once
for piece in bot.stream("What does the picture show?", [sys.argv[2]]):
    sys.stdout.write(piece or "."); sys.stdout.flush()
"""


def test_a_worker_that_dies_mid_answer_is_a_clear_error_in_bounded_time(converted, images, workers):
    model = converted(TinySpec(arch="qwen2", seed=15, layers=4, tower="folder"), "F32", "f32")
    proc = subprocess.Popen([sys.executable, "-c", LONG_ANSWER, str(model.manifest_path), images[0],
                             workers.endpoints], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.read(1), proc.stderr.read()  # the answer has started
        workers.procs[1].kill()
        _, err = proc.communicate(timeout=60)
    finally:  # a 50,000-token answer must not outlive a failed check
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3 and f"error: RPC worker 127.0.0.1:{workers.ports[1]}: " in err, err[-2000:]
    assert "restart the worker and ask again" in err
    assert err.count("\n") == 1, err  # one line, no core dump, no traceback


def test_doctor_reports_rpc_and_the_workers_memory(workers):
    proc = run_cli("doctor", "--rpc", workers.endpoints)
    assert "RPC backend      built in" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("RPC worker       127.0.0.1:") == 2
    assert "fits across the workers and this machine" in proc.stdout
    # The recommendation is made from what fits across them (it said "too large" beside "fits").
    across = {line.split()[0]: line.rsplit(": ", 1)[1] for line in proc.stdout.splitlines()
              if "fits across the workers" in line}
    recommended = proc.stdout.split("recommended", 1)[1]
    for name, quants in across.items():
        if quants != "none":
            best = quants.split(", ")[0]  # listed best first (doctor's quality order)
            assert f"{name}: {best}" in recommended, (best, recommended)
            assert f"{name}: too large" not in recommended


def test_a_worker_refuses_a_public_address_without_the_acknowledgement():
    proc = run_cli("rpc-worker", "--host", "0.0.0.0", "--port", str(free_port()))
    assert proc.returncode == 1 and "no authentication or encryption" in proc.stderr and "ssh -N -L" in proc.stderr
    assert "Traceback" not in proc.stderr


LATER_MODEL = """
import sys
from huatuo_local.runtime.engine.engine import Engine, EngineOptions
llm, mmproj, endpoints = sys.argv[1:4]
Engine(llm, mmproj, EngineOptions(n_ctx=256, rpc=tuple(endpoints.split(",")))).close()
print("split model closed", flush=True)
sys.stdin.readline()  # the workers are gone now
Engine(llm, mmproj, EngineOptions(n_ctx=256)).close()
print("local model loaded", flush=True)
"""


def test_a_later_local_model_does_not_touch_the_workers_of_an_earlier_one(converted, workers):
    """llama.cpp keeps registered workers in a process-wide registry; a later model without --rpc (the
    Python API, a server reloading) must not pick them up, or it aborts once they are gone."""
    model = converted(TinySpec(arch="qwen2", seed=15, layers=4, tower="folder"), "F32", "f32")
    proc = subprocess.Popen([sys.executable, "-c", LATER_MODEL, str(model.llm_path), str(model.mmproj_path),
                             workers.endpoints], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "split model closed", proc.stderr.read()
    workers.stop()
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0 and "local model loaded" in out, err[-2000:]


def test_serve_stays_up_when_a_worker_dies_and_answers_again_when_it_is_back(converted, images, workers, tmp_path):
    """serve --rpc: a worker killed mid-answer loses that answer (the client sees its stream end), the
    server reports the lost worker on /health and answers again, the same greedy answer, once the
    worker is back on its port."""
    import base64

    import httpx
    import openai
    from test_serve import listening_url

    model = converted(TinySpec(arch="qwen2", seed=15, layers=4, tower="folder"), "F32", "f32")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([*CLI, "serve", "--model", str(model.manifest_path), "--port", "0",
                                  "--parallel", "1", "--ctx", "30000", "--rpc", workers.endpoints, "--tensor-split",
                                  "0,1,1"], cwd=ROOT, stdout=out, stderr=out)
    url = listening_url(serve, log, time.time() + 120)  # a restarted server keeps the port the first one took

    def health(deadline_s: float, want: int, saying: str = "") -> dict:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{url}/health", timeout=2)
                if r.status_code == want and (want == 200 or r.json().get("status") == "error"):
                    if saying in r.json().get("error", ""):
                        return r.json()
            except httpx.HTTPError:
                pass
            assert serve.poll() is None, log.read_text()
            time.sleep(0.2)
        raise AssertionError(f"/health never gave {want}: {log.read_text()[-2000:]}")

    image = "data:image/png;base64," + base64.b64encode(open(images[0], "rb").read()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": QUESTION}]}]
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    try:
        health(120, 200)
        before = c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
        before = before.choices[0].message.content
        assert before == ask(model, images)  # through the server and the workers: chat's answer
        stream = c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20000,
                                           stream=True, extra_body={"min_tokens": 20000})
        chunks = iter(stream)
        next(chunks)  # the answer is streaming
        dead_port = workers.ports[1]
        workers.procs[1].kill()
        t0 = time.monotonic()
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for _ in chunks:
                pass
        assert time.monotonic() - t0 < 30
        # The server is up again and says why it cannot answer: the worker cannot be reached (before its next
        # attempt, /health may say why the last one ended).
        health(60, 503, f"127.0.0.1:{dead_port}: unreachable")
        back = subprocess.Popen([*CLI, "rpc-worker", "--port", str(dead_port), "--threads", "1"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        workers.procs[1] = back
        assert listening_port(back) == dead_port
        health(60, 200)
        after = c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
        assert after.choices[0].message.content == before
        assert re.search(rf"error: RPC worker 127.0.0.1:{dead_port}: (the connection was lost|closed the connection)",
                         log.read_text()), log.read_text()[-2000:]
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0, log.read_text()[-2000:]


def test_a_worker_of_another_protocol_version_is_refused_naming_both(converted, images):
    """A stand-in for an older worker: it answers llama.cpp's HELLO (| cmd | size | caps | → | size |
    major minor patch pad | caps |) with protocol 6.0.0; nothing is loaded, one line names both versions."""
    import struct
    import threading

    model = converted(TinySpec(arch="qwen2", seed=15, layers=4, tower="folder"), "F32", "f32")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]

    def old_worker() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                head = conn.recv(9, socket.MSG_WAITALL)
                if len(head) < 9:
                    continue
                (size,) = struct.unpack("<Q", head[1:])
                conn.recv(size, socket.MSG_WAITALL)
                conn.sendall(struct.pack("<Q", 4 + size) + bytes([6, 0, 0, 0]) + bytes(size))

    threading.Thread(target=old_worker, daemon=True).start()
    try:
        proc = run_cli("chat", "--model", str(model.manifest_path), *images, "-p", QUESTION, "--rpc",
                       f"127.0.0.1:{port}", timeout=120)
    finally:
        server.close()
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"RPC worker 127.0.0.1:{port} speaks protocol 6.0.0, this engine 7.0.0" in proc.stderr


def test_eval_over_rpc_workers_gives_the_local_answers(workers, converted, images, tmp_path):
    """`eval --rpc` (issue 22: never tested): the same greedy answers as the local run, the layers placed on
    the workers."""
    model = converted(TinySpec(arch="qwen2", seed=15, layers=4, tower="folder"), "F32", "f32")
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([
        {"question": "Which organ is shown?", "options": ["liver", "lung", "heart"], "answer": "lung",
         "image": [str(images[0])], "dataset": "VQA-RAD"},
        {"question": "Is there a fracture?", "options": ["yes", "no"], "answer": "no", "image": [str(images[0])],
         "dataset": "SLAKE"}]))

    def rows(out):
        return {r["number"]: r["output"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}

    # -ngl 0: this machine's share on its CPU also where it has a GPU, the same arithmetic as the workers'.
    local = run_cli("eval", str(data), "--model", str(model.manifest_path), "--greedy", "--out", str(tmp_path / "l"),
                    "-ngl", "0")
    assert local.returncode == 0, local.stderr
    remote = run_cli("eval", str(data), "--model", str(model.manifest_path), "--greedy", "--out", str(tmp_path / "r"),
                     "--rpc", workers.endpoints, "--tensor-split", "0,1,1", "-ngl", "0",
                     env={"HUATUO_LOCAL_VERBOSE": "1"})
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert "assigned to device RPC0" in remote.stderr and "assigned to device RPC1" in remote.stderr
    assert rows(tmp_path / "r") == rows(tmp_path / "l") and len(rows(tmp_path / "l")) == 2
