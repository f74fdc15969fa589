"""`serve --ray`: one endpoint over replicas on a Ray cluster (issue 30), driven as users drive it: a private
cluster on loopback (`--ray local`), two replicas of a tiny model, the official `openai` client. Greedy
answers must equal `chat`'s; a follow-up goes where its image is; an image encoded on one replica is read
from the shared prefix cache by another; a replica killed mid-answer ends that answer with an error event
and nothing else; nothing of Ray is left running afterwards."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import openai
import psutil
import pytest
from PIL import Image
from test_serve import QUESTIONS, SPEC, ask, client, data_uri, server, streamed_text, user

KEYS = ("key-of-ward-a", "key-of-ward-b")


@pytest.fixture(scope="module")
def model(converted):
    return converted(SPEC, "F32", "f32")


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster-scans")
    paths = []
    for i in range(8):
        rng = np.random.default_rng(700 + i)
        Image.fromarray((rng.random((90 + 7 * i, 120, 3)) * 255).astype(np.uint8)).save(folder / f"c{i}.png")
        paths.append(folder / f"c{i}.png")
    return paths


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    keys = tmp / "keys"
    keys.write_text("\n".join(KEYS) + "\n")
    keys.chmod(0o600)
    with server(str(model.manifest_path), tmp, "--ray", "local", "--replicas", "2", "--threads", "1",
                "--parallel", "2", "--ctx", "4096", "--api-key-file", str(keys), deadline_s=300) as (url, proc, log):
        yield url, proc, log


@pytest.fixture(scope="module")
def reference(model):
    """chat's greedy answers, from the Python API in this process (the same scheduler as `chat`)."""
    from huatuo_local import HuatuoChatbot

    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=16, prefix_cache=False) as bot:
        def answer(question: str, image=None) -> str:
            bot.clear_history()
            return bot.chat(question, [str(image)] if image else [])

        yield answer


def raw(c: openai.OpenAI, messages: list, max_tokens: int = 16) -> dict:
    r = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, temperature=0,
                                                   max_tokens=max_tokens)
    return json.loads(r.text)


def replicas(url: str, key: str = KEYS[0]) -> list[dict]:
    body = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
    return body["cluster"]["replicas"]


def test_health_lists_two_replicas_in_their_own_processes(cluster):
    url, proc, log = cluster
    deadline = time.time() + 30  # routing stats reach the router every second
    while len({r.get("pid") for r in replicas(url)} - {None}) < 2:
        assert time.time() < deadline, replicas(url)
        time.sleep(0.5)
    pids = {r["pid"] for r in replicas(url)}
    ours = set(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
    assert pids <= ours and proc.pid not in pids  # Ray Serve's replica actors: processes of this server's cluster
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # without a key: only whether it answers
    # Nothing of the private cluster listens beyond loopback: Ray's servers, the replicas', ours.
    listening = []
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        try:
            listening += [(p.pid, p.name(), c.laddr.ip) for c in p.net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert len({pid for pid, _, _ in listening}) >= 5, listening  # the server, GCS, raylet, both replicas
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, _, ip in listening), listening
    # The private cluster's folder (named in the log) is owner-only: Ray opens its own (inside) to everyone.
    folder = re.search(r"its files: (\S+),", log.read_text()).group(1)
    assert os.stat(folder).st_mode & 0o777 == 0o700


def test_greedy_answers_equal_chat_on_both_replicas(cluster, scans, reference):
    url, _, _ = cluster
    c = client(url, KEYS[0])
    seen = set()
    for i, scan in enumerate(scans):  # new conversations: power of two choices spreads them
        question = QUESTIONS[i % 3]
        want = reference(question, scan)
        body = raw(c, [user(question, data_uri(scan))])
        assert body["choices"][0]["message"]["content"] == want, (i, body, want)
        seen.add(body["huatuo"]["replica"]["pid"])
        # streamed, the same conversation goes to the same replica and gives the same text
        assert streamed_text(ask(c, [user(question, data_uri(scan))], stream=True))[0] == want
        if len(seen) == 2 and i >= 2:
            break
    assert len(seen) == 2, "8 new conversations all went to one replica"
    want = reference("Say hello.")
    assert ask(c, [user("Say hello.")]).choices[0].message.content == want


def test_a_follow_up_goes_where_its_image_is_and_reuses_the_whole_first_turn(cluster, scans, reference):
    url, _, _ = cluster
    c = client(url, KEYS[0])
    first_turn = [user(QUESTIONS[1], data_uri(scans[6]))]
    first = raw(c, first_turn)
    answer = first["choices"][0]["message"]["content"]
    follow = raw(c, [*first_turn, {"role": "assistant", "content": answer}, user("And the size?")])
    assert follow["huatuo"]["replica"] == first["huatuo"]["replica"]
    cached = follow["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"], (cached, first["usage"])
    assert follow["huatuo"]["images_encoded"] == 0


def test_tenants_are_kept_apart_across_replicas(cluster, scans):
    url, _, _ = cluster
    a, b = client(url, KEYS[0]), client(url, KEYS[1])
    question = [user("Patient Maria Lopez, CD4 count 180. What is shown?", data_uri(scans[7]))]
    raw(a, question)
    other = raw(b, question)  # the other ward's key, the same words and picture
    ext = other["huatuo"]
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert ext["images_encoded"] == 1 and ext["prefix_cache_hits"] == 0 and ext["tokens_reused"] == 0
    again = raw(a, question)  # ward A's own is still reused, where it is
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 576


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _wait_for_two(url: str, gone: int | None = None) -> None:
    deadline = time.time() + 180
    while True:
        pids = {r.get("pid") for r in replicas(url)} - {None, gone}
        if len(pids) >= 2 and httpx.get(f"{url}/health").status_code == 200:
            return
        assert time.time() < deadline, replicas(url)
        time.sleep(0.5)


def test_a_follow_up_on_the_other_replica_reads_the_image_from_the_shared_cache(cluster, scans, reference):
    url, _, _ = cluster
    _wait_for_two(url)
    c = client(url, KEYS[0])
    scan = scans[0]
    first_turn = [user("Describe the findings.", data_uri(scan))]
    first = raw(c, first_turn)
    home = first["huatuo"]["replica"]
    _kill(home["pid"])  # the replica that holds the conversation is lost: the follow-up goes to the other
    answer = first["choices"][0]["message"]["content"]
    follow = raw(c, [*first_turn, {"role": "assistant", "content": answer}, user("And the size?")])
    ext = follow["huatuo"]
    assert ext["replica"]["pid"] != home["pid"]
    assert ext["images_encoded"] == 0 and ext["prefix_cache_hits"] == 1, ext
    assert follow["usage"]["prompt_tokens_details"]["cached_tokens"] > 576
    _wait_for_two(url, gone=home["pid"])  # Ray Serve starts a replica in place of the lost one


def test_a_replica_killed_mid_stream_ends_that_stream_only(cluster, scans):
    url, _, _ = cluster
    _wait_for_two(url)
    c = client(url, KEYS[0])
    # One picture whose conversation lives on each replica (affinity keeps them there).
    homes: dict[int, object] = {}
    for scan in scans:
        pid = raw(c, [user("Hi.", data_uri(scan))], max_tokens=1)["huatuo"]["replica"]["pid"]
        homes.setdefault(pid, scan)
        if len(homes) == 2:
            break
    assert len(homes) == 2, "power of two choices never chose the second replica in 8 new conversations"
    (victim, doomed), (survivor, kept) = homes.items()
    outcome: dict[str, object] = {}
    started = threading.Event()

    def stream(name: str, scan, kill: bool) -> None:
        s = c.chat.completions.create(model="tiny", messages=[user("Write a long report.", data_uri(scan))],
                                      temperature=0, max_tokens=400, stream=True, extra_body={"min_tokens": 400},
                                      stream_options={"include_usage": True})
        pieces, usage = [], None
        try:
            for chunk in s:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    if kill and len(pieces) == 3:
                        _kill(victim)
                    started.set()
                if chunk.usage:
                    usage = chunk.model_extra["huatuo"]
            outcome[name] = ("done", "".join(pieces), usage)
        except openai.APIError as exc:
            outcome[name] = ("error", exc.message, len(pieces))

    other = threading.Thread(target=stream, args=("kept", kept, False))
    other.start()
    started.wait(60)
    stream("doomed", doomed, True)
    other.join(180)
    assert outcome["doomed"][0] == "error" and "replica" in outcome["doomed"][1], outcome["doomed"]
    status, text, usage = outcome["kept"]
    assert status == "done" and usage["replica"]["pid"] == survivor and usage["tokens_generated"] == 400, outcome
    # New requests are all answered while Ray Serve replaces the lost replica.
    for i in range(4):
        got = raw(c, [user(f"Question {i}?", data_uri(scans[i]))], max_tokens=4)
        assert got["choices"][0]["message"]["content"] is not None and got["huatuo"]["replica"]["pid"] != victim
    _wait_for_two(url, gone=victim)


def test_sigterm_leaves_no_ray_process(cluster):
    url, proc, log = cluster
    tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) >= 4, tree  # Ray's own daemons and the two replicas
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    deadline = time.time() + 30
    while True:
        alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        assert time.time() < deadline, {p: " ".join(psutil.Process(p).cmdline())[:120] for p in alive}
        time.sleep(0.5)
    assert "stopped" in log.read_text()


# --- a cluster started with `ray start`, and a machine that joins it ---------------------------------------


def _ray_start(args: list[str], env: dict, started: list) -> subprocess.Popen:
    """`ray start ARGS` in a process group of its own: every process of that node (its daemons outlive `ray
    start`) is ended by the group's id, never by `ray stop` (which ends every Ray process of the user)."""
    head = ["--include-dashboard=false"] if "--head" in args else []
    starter = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", *args, *head,
                                "--disable-usage-stats"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    started.append(starter)  # ended by the caller whatever happens next
    _, said = starter.communicate(timeout=120)
    assert starter.returncode == 0, said[-2000:]
    return starter


def test_an_existing_cluster_with_room_for_one_replica_of_two(model, scans, tmp_path, reference):
    """`serve --ray HOST:PORT` on a cluster started with `ray start --head` (one CPU: room for one replica of
    the two asked for): it answers with the one, and /health says 503 "starting replicas" while the other
    waits for a machine to join (Ray Serve places it then; not played here: a second Ray node on this machine
    cannot stay on loopback). SIGTERM ends our application, never the cluster."""
    from test_eval import stop_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_dir = tempfile.mkdtemp(prefix="hr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # The cluster's own token (never ~/.ray's); single-machine mode keeps its traffic on loopback.
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **token)
    nodes = []
    try:
        _ray_start(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    f"--temp-dir={ray_dir}"], env, nodes)
        with server(str(model.manifest_path), tmp_path, "--ray", f"127.0.0.1:{port}", "--replicas", "2",
                    "--threads", "1", "--ctx", "4096", env=token, wait=False, deadline_s=300) as (url, proc, log):
            deadline = time.time() + 180
            while True:  # (the replicas' states reach /health within a second of Ray Serve's)
                health = httpx.get(f"{url}/health", timeout=10)
                body = health.json()
                if body.get("status") == "starting replicas" and body["cluster"]["replica_states"].get("RUNNING"):
                    break
                assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
            assert health.status_code == 503 and body["cluster"]["replica_states"]["RUNNING"] == 1, body
            c = client(url, "none")
            got = raw(c, [user(QUESTIONS[0], data_uri(scans[0]))])
            assert got["choices"][0]["message"]["content"] == reference(QUESTIONS[0], scans[0])
            assert httpx.get(f"{url}/health", timeout=10).status_code == 503  # still one of two
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()[-3000:]
        # The cluster is still there, without our application.
        assert all(n.poll() is not None for n in nodes)  # (`ray start` returned; its daemons run on)
        listed = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto'); from ray import serve; "
                                 "print(sorted(serve.status().applications))"], capture_output=True, text=True,
                                env=dict(env, RAY_ADDRESS=f"127.0.0.1:{port}"), timeout=120)
        assert listed.returncode == 0 and listed.stdout.strip().splitlines()[-1] == "[]", listed.stderr[-2000:]
    finally:
        for n in nodes:
            stop_group(n.pid)
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_replicas_scale_up_with_the_queue(model, tmp_path):
    """--min-replicas/--max-replicas: Ray Serve's autoscaler adds a replica when more answers wait than the one
    replica answers at once (--parallel 1, four clients)."""
    with server(str(model.manifest_path), tmp_path, "--ray", "local", "--replicas", "1", "--min-replicas", "1",
                "--max-replicas", "2", "--threads", "1", "--parallel", "1", "--ctx", "4096",
                deadline_s=300) as (url, proc, log):
        assert replicas(url, "none") and len(replicas(url, "none")) == 1
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                    "messages": [user("Write a long report.")], "max_tokens": 3000, "min_tokens": 3000,
                    "temperature": 0.8})

        clients = [threading.Thread(target=busy) for _ in range(4)]
        for t in clients:
            t.start()
        try:
            deadline = time.time() + 120
            while len({r.get("pid") for r in replicas(url, "none")} - {None}) < 2:
                assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
                time.sleep(1)
        finally:
            stop.set()
            for t in clients:
                t.join(300)
