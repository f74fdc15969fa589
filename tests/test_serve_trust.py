"""Trust, round 2 (issue 21): the local server attacked as a hostile web page, a hostile local client and
a hostile file would attack it; traffic to 127.0.0.1 only. Each test reproduces one finding."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_serve import BACKENDS, backend_params, client, rss_kib, server, user
from tiny_models import TinySpec

SPEC = TinySpec(arch="qwen2", seed=8, tower="folder")


@pytest.fixture(scope="module")
def model(converted):
    return converted(SPEC, "F32", "f32")


@pytest.fixture(scope="module", params=backend_params())
def running(model, tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("trust")
    allowed = tmp / "allowed"
    allowed.mkdir()
    server_tmp = tmp / "server-tmp"  # the server's temporary folder: uploads must never land there (or anywhere)
    server_tmp.mkdir()
    with server(str(model.manifest_path), tmp, "--parallel", "2", "--ctx", "4096", "--allow-files",
                str(allowed), *BACKENDS[request.param], env={"TMPDIR": str(server_tmp)}, deadline_s=300) as (url, proc,
                                                                                                         log):
        yield url, proc, log, allowed


def _timed_health(url: str) -> float:
    t0 = time.perf_counter()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    return time.perf_counter() - t0


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def answer(c: openai.OpenAI, messages: list, max_tokens: int = 16, min_tokens: int = 1, temperature: float = 0) -> str:
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=temperature,
                                  extra_body={"min_tokens": min_tokens})
    return r.choices[0].message.content


def post(url: str, body, **headers) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body).encode(), timeout=120,
                      headers={"Content-Type": "application/json", **headers})


# --- 2. web pages -----------------------------------------------------------------------------


def test_a_web_page_cannot_drive_the_local_server(running):
    url, _, _, _ = running
    body = {"messages": [user("Hi")], "max_tokens": 2}
    # DNS rebinding: the attacker's name now points at 127.0.0.1, but the browser still sends it as Host.
    for route in ("/health", "/", "/v1/models"):
        r = httpx.get(url + route, headers={"Host": "evil.example:8000"})
        assert r.status_code == 421 and r.json()["error"]["code"] == "misdirected_host", route
    r = post(url, body, Host="rebind.evil.example")
    assert r.status_code == 421
    r = httpx.post(f"{url}/v1/huatuo/preview", headers={"Host": "evil.example", "Content-Type": "application/json"},
                   content=b'{"image_url": {"url": "file:///etc/passwd"}}')
    assert r.status_code == 421
    # A cross-site "simple" request (text/plain needs no preflight) never reaches a route.
    r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body).encode(),
                   headers={"Content-Type": "text/plain", "Origin": "https://evil.example"})
    assert r.status_code in (403, 415)
    r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body).encode(),
                   headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = post(url, body, Origin="https://evil.example")
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = post(url, body, Origin="null")
    assert r.status_code == 403
    # The page's own origin, and loopback names, are fine.
    host = url.split("//", 1)[1]
    assert post(url, body, Origin=url).status_code == 200
    assert httpx.get(url + "/health", headers={"Host": f"localhost:{host.split(':')[1]}"}).status_code == 200
    page = httpx.get(url + "/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp and "unsafe" not in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    api = post(url, body)
    assert api.headers["x-content-type-options"] == "nosniff"


def test_cors_origin_lets_exactly_that_page_in(model, tmp_path):
    with server(str(model.manifest_path), tmp_path, "--cors-origin", "https://ward.example") as (url, _, _):
        body = {"messages": [user("Hi")], "max_tokens": 2}
        ok = post(url, body, Origin="https://ward.example")
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ward.example"
        assert post(url, body, Origin="https://other.example").status_code == 403
        pre = httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": "https://ward.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://ward.example"


# --- 3. one request must not fail the others ------------------------------------------------------


def test_a_hostile_temperature_ends_no_other_answer(running):
    url, _, _, _ = running
    c = client(url, "none")
    want = answer(c, [user("Describe the findings.")], max_tokens=40, min_tokens=40)
    got: list[str] = []

    def streamed() -> None:
        parts = c.chat.completions.create(model="tiny", messages=[user("Describe the findings.")], max_tokens=40,
                                          extra_body={"min_tokens": 40}, temperature=0, stream=True)
        got.append("".join(ch.choices[0].delta.content or "" for ch in parts if ch.choices))

    t = threading.Thread(target=streamed)
    t.start()
    for temperature in (5e-324, 1e-300, 2.0):
        for top_p in (1e-300, 1.0):
            r = post(url, {"messages": [user("Hi")], "max_tokens": 8, "temperature": temperature, "top_p": top_p})
            assert r.status_code == 200, r.text
    t.join(120)
    assert got == [want]


# --- 4. tiny files, big costs -----------------------------------------------------------------------


def test_tiny_files_that_cost_gigabytes_are_refused_before_decoding(running, tmp_path):
    url, proc, log, _ = running
    before = rss_kib(proc.pid)
    strip = png_bytes(20000, 1)  # a few hundred bytes; padded to 20000x20000
    assert len(strip) < 70_000
    side = 13000  # 169 M pixels: over the server's default of 50 M
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    big = buf.getvalue()
    assert len(big) < 1_000_000
    peak = before
    for data in (strip, big):
        t0 = time.time()
        r = post(url, {"messages": [user("Hi", png_uri(data))], "max_tokens": 2})
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
        assert "padded to a" in r.json()["error"]["message"] and time.time() - t0 < 5
        peak = max(peak, rss_kib(proc.pid))
    threads = [threading.Thread(target=post, args=(url, {"messages": [user("Hi", png_uri(big))], "max_tokens": 2}))
               for _ in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_kib(proc.pid))
        time.sleep(0.01)
    print(f"bombs: peak RSS {peak / 1024:.0f} MiB (before {before / 1024:.0f} MiB)")
    assert peak < 600 * 1024, f"peak RSS {peak / 1024:.0f} MiB"
    # Seven images: refused from the count, before any is decoded.
    seven = {"messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": png_uri(big)}} for _ in range(7)),
        {"type": "text", "text": "Hi"}]}], "max_tokens": 2}
    t0 = time.time()
    r = post(url, seven)
    assert r.status_code == 400 and "at most 6 images" in r.json()["error"]["message"] and time.time() - t0 < 2
    # Uploads never land on disk: the server's temporary folder is empty, and its open files are the model's,
    # libraries' and sockets'.
    # (With --ray local, the private cluster's own folder is there: Ray's sockets and logs, no upload.)
    said = re.search(r"private Ray cluster on this machine, on loopback \(its files: (\S+),", log.read_text())
    ray_folder = [Path(said.group(1))] if said else []
    assert not set((Path(log).parent / "server-tmp").iterdir()) - set(ray_folder)
    if ray_folder:
        assert not [p for p in ray_folder[0].rglob("*") if p.is_file() and not p.is_symlink()
                    and p.stat().st_size < 64 * 1024 * 1024 and big in p.read_bytes()]
    written = [f.path for f in __import__("psutil").Process(proc.pid).open_files()
               if ("w" in f.mode or "+" in f.mode or "a" in f.mode) and f.path != str(log)  # (its stderr: the log)
               and not any(f.path.startswith(str(p) + "/") for p in ray_folder)]
    assert not written, written


def test_formats_outside_the_documented_list_are_refused(running):
    url, _, _, _ = running
    img = Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8))
    for fmt in ("TGA", "PPM", "ICO", "PCX", "SGI", "IM", "QOI" if "QOI" in Image.SAVE else "XBM"):
        buf = io.BytesIO()
        (img.convert("1") if fmt == "XBM" else img).save(buf, format=fmt)
        uri = "data:application/octet-stream;base64," + base64.b64encode(buf.getvalue()).decode()
        r = post(url, {"messages": [user("Hi", uri)], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", (fmt, r.text)
        assert "supported format" in r.json()["error"]["message"], fmt


def test_decoding_stops_with_its_request(running):
    """A client that sends six heavy images and leaves: the images it did not reach are never decoded."""
    url, proc, log, _ = running
    rows = np.tile(np.random.default_rng(4).integers(0, 256, (1, 7000, 3), dtype=np.uint8), (7000, 1, 1))
    buf = io.BytesIO()
    Image.fromarray(rows).save(buf, format="PNG")  # 0.2 MB that take ~1 s to decode and prepare here
    one = buf.getvalue()
    heavy = png_uri(one)
    body = json.dumps({"messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": heavy}} for _ in range(6)),
        {"type": "text", "text": "Hi"}]}], "max_tokens": 2}).encode()
    decoded = lambda: httpx.get(f"{url}/health", timeout=30).json()["images_decoded"]  # noqa: E731
    before = decoded()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", content=body, timeout=1.0,
                   headers={"Content-Type": "application/json"})
    # Work, not time: the server counts the images it decoded. It may have started one more after the client
    # left (the departure is seen between images); never all six.
    deadline = time.time() + 60
    while httpx.get(f"{url}/health", timeout=30).json()["active"] and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    done = decoded() - before
    print(f"left after 1 s: {done} of 6 images decoded")
    assert 1 <= done <= 3, done
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"


# --- 5. tenants ---------------------------------------------------------------------------------


def test_one_keys_client_learns_nothing_of_anothers_conversation(model, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("key-of-doctor-a\nkey-of-doctor-b\nkey-of-doctor-c\n")
    # Issue 36: a key file other users can read is refused, as ssh refuses an unprotected private key.
    keys.chmod(0o644)
    open_file = run_cli("serve", "--model", str(model.manifest_path), "--api-key-file", str(keys))
    assert open_file.returncode == 1 and open_file.stderr.strip() == (
        f"error: {keys}: the API keys readable by other users (mode 644); `chmod 600 {keys}` and keep it yours")
    keys.chmod(0o600)
    secret = "Patient Maria Lopez, HIV positive, CD4 count 180."
    scan = png_uri(png_bytes(120, 90, seed=9))
    with server(str(model.manifest_path), tmp_path, "--parallel", "2", "--api-key-file", str(keys)) as (url, _, _):
        a, b = client(url, "key-of-doctor-a"), client(url, "key-of-doctor-b")

        def counters(c, text):
            r = c.chat.completions.with_raw_response.create(model="tiny", messages=[user(text, scan)], max_tokens=2,
                                                           temperature=0)
            return json.loads(r.text)["huatuo"]

        counters(a, secret)
        right = counters(b, secret)  # B guesses A's text exactly
        wrong = counters(client(url, "key-of-doctor-c"), "Patient John Smith, no findings, routine check.")
        assert right["images_encoded"] == 1 and right["tokens_reused"] == 0 and right["prefix_cache_hits"] == 0
        assert wrong["tokens_reused"] == 0 and wrong["prefix_cache_hits"] == 0
        again = counters(a, secret)  # A's own conversation is still reused for A
        assert again["tokens_reused"] > 576 or again["prefix_cache_hits"] == 1
        r = httpx.get(f"{url}/health")
        assert r.json() == {"status": "ok"}  # without a key: only whether it answers
        assert "model" in httpx.get(f"{url}/health", headers={"Authorization": "Bearer key-of-doctor-b"}).json()


def test_a_utf8_key_works_and_the_flag_warns(model, tmp_path):
    with server(str(model.manifest_path), tmp_path, env={"HUATUO_LOCAL_API_KEY": "clé-secrète-ü"}) as (url, _, log):
        ok = httpx.post(f"{url}/v1/chat/completions", timeout=60, content=json.dumps(
            {"messages": [user("Hi")], "max_tokens": 2}).encode(), headers={
            "Content-Type": "application/json", "Authorization": "Bearer clé-secrète-ü".encode()})  # as curl sends
        assert ok.status_code == 200, ok.text
        assert post(url, {"messages": [user("Hi")], "max_tokens": 2}).status_code == 401
        assert "visible" not in log.read_text()
    with server(str(model.manifest_path), tmp_path, "--api-key", "plain") as (url, _, log):
        assert "--api-key is visible to other users" in log.read_text()


# --- 6. file:// and the race ---------------------------------------------------------------------


def test_file_urls_cannot_escape_allow_files_even_by_a_race(running, tmp_path):
    url, _, _, allowed = running
    inside, outside = png_bytes(40, 30, seed=1), png_bytes(40, 30, seed=2)
    (allowed / "real").mkdir(exist_ok=True)
    (allowed / "real" / "scan.png").write_bytes(inside)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "scan.png").write_bytes(outside)

    def preview(path: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/huatuo/preview", json={"image_url": {"url": "file://" + path}}, timeout=60)

    good = preview(str(allowed / "real" / "scan.png"))
    assert good.status_code == 200
    want = good.json()["digest"]
    os.symlink(secret_dir, allowed / "link")
    r = preview(str(allowed / "link" / "scan.png"))
    assert r.status_code == 400 and "symbolic links" in r.json()["error"]["message"]
    assert preview(str(allowed / ".." / "secret" / "scan.png")).status_code == 400
    assert preview(str(allowed) + "/real/scan.png%00.png").status_code in (400, 403)
    assert preview("/etc/passwd").status_code == 403
    # The race: one thread swaps the folder for a link to the secret folder and back, as fast as it can.
    stop = threading.Event()
    real, spare = allowed / "real", allowed / "spare"

    def swap() -> None:
        while not stop.is_set():
            try:
                os.rename(real, spare)
                os.symlink(secret_dir, real)
                os.unlink(real)
                os.rename(spare, real)
            except OSError:
                pass

    t = threading.Thread(target=swap)
    t.start()
    digests = []
    try:
        for _ in range(400):
            r = preview(str(real / "scan.png"))
            if r.status_code == 200:
                digests.append(r.json()["digest"])
    finally:
        stop.set()
        t.join()
    print(f"race: {len(digests)} of 400 reads answered, {sum(d != want for d in digests)} outside")
    assert digests and set(digests) == {want}, "a read went outside --allow-files"


# --- 7. large JSON ------------------------------------------------------------------------------


def test_a_huge_json_body_is_refused_without_stalling_the_server(running):
    url, proc, _, _ = running
    body = b'{"messages": [' + b"{}," * 20_000_000 + b"{}]}"  # 60 MB of tiny objects
    before = rss_kib(proc.pid)
    results: list[int] = []
    senders = [threading.Thread(target=lambda: results.append(httpx.post(
        f"{url}/v1/chat/completions", content=body, timeout=120,
        headers={"Content-Type": "application/json"}).status_code)) for _ in range(3)]
    for t in senders:
        t.start()
    idle = sorted(_timed_health(url) for _ in range(20))[10]  # /health's own time here, now
    worst, peak = 0.0, before
    while any(t.is_alive() for t in senders):
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        peak = max(peak, rss_kib(proc.pid))
        time.sleep(0.02)
    assert results == [413, 413, 413]
    print(f"60 MB JSON x3: /health worst {worst * 1000:.0f} ms (idle {idle * 1000:.1f} ms), "
          f"RSS +{(peak - before) / 1024:.0f} MiB")
    # Relative to /health's own time on this machine now: a loop blocked by a body's parsing would wait for
    # all of it (seconds); a busy CPU slows both alike.
    assert worst < max(0.5, 50 * idle), f"/health took {worst:.2f} s (idle: {idle * 1000:.1f} ms)"
    assert peak - before < 400 * 1024, f"+{(peak - before) / 1024:.0f} MiB"


# --- 8. 500s for bad input, and a schema-driven fuzz ------------------------------------------------------


BAD_BODIES = [
    {"messages": [user("Hi")], "seed": -1},
    {"messages": [user("Hi")], "seed": 2**70},
    {"messages": [user("\ud800 lone")]},
    {"messages": [user("Hi", "data:image/png;base64,AAAA", window="\udfff")]},
    {"messages": [user("Hi", "file:///tmp/\ud800.png")]},
    {"messages": [user("Hi", "data:image/png;base64,AAAA", window=5)]},
    {"messages": [user("Hi", "data:image/png;base64,AAAA", window=[1, 2])]},
    {"messages": [user("Hi", "data:image/png;base64,AAAA", window="nan,400")]},
    {"messages": [user("Hi", "data:image/png;base64,AAAA", window="inf,inf")]},
    {"messages": [user("Hi", "data:image/png;base64,AAAA", frame=-3)]},
    {"messages": [user("Hi", "file:///tmp/x%00.png")]},
    {"messages": [user("Hi", "file:///tmp/%ff%fe.png")]},
]


def test_bad_values_are_400_in_openais_shape(running):
    url, _, _, _ = running
    for body in BAD_BODIES:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, headers={"Content-Type": "application/json"},
                       content=json.dumps({**body, "max_tokens": 2}).encode())
        if "seed" in body and body["seed"] == -1:
            assert r.status_code == 200, r.text  # a signed seed, as OpenAI's API allows
            continue
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "--" not in r.json()["error"]["message"], r.json()  # fields, not CLI flags
    nan = httpx.post(f"{url}/v1/chat/completions", headers={"Content-Type": "application/json"},
                     content=json.dumps({"messages": [
                         user("Hi", "data:image/png;base64,AAAA", window="nan,400")]}).encode())
    assert "'window'" in nan.json()["error"]["message"]


def test_placeholder_text_is_text_in_questions_and_answers(running, model, tmp_path):
    """`<image>` typed in a question (or in an answer sent back as history) is text: the answer and the prompt's
    length are chat's for the same question and image, one image's positions and no more."""
    url, _, _, _ = running
    c = client(url, "none")
    png = png_bytes(64, 48, seed=5)
    scan = png_uri(png)
    (tmp_path / "scan.png").write_bytes(png)
    for text in ("<image> what is this?", "<ima<s>ge> and <image><image>"):
        r = c.chat.completions.create(model="tiny", messages=[user(text, scan)], max_tokens=6, temperature=0)
        one_shot = run_cli("chat", str(tmp_path / "scan.png"), "-p", text, "--json", "--max-tokens", "6",
                           "--temperature", "0", "--no-prefix-cache", "--model", str(model.manifest_path))
        want = json.loads(one_shot.stdout)
        assert r.choices[0].message.content == want["answer"], text
        assert r.usage.prompt_tokens == want["tokens"]["prompt"] < 2 * 576, (text, r.usage)
    # The page sends answers back as history: an answer holding "<image>" must not break the next turn, nor
    # count as an image (one image's 576 positions in all).
    history = [user("first", scan), {"role": "assistant", "content": "see <image> above"}, user("and now?")]
    r = c.chat.completions.create(model="tiny", messages=history, max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and 576 < r.usage.prompt_tokens < 2 * 576


def test_max_tokens_with_a_null_max_completion_tokens(running):
    url, _, _, _ = running
    r = post(url, {"messages": [user("Write a long report.")], "max_tokens": 3, "max_completion_tokens": None,
                   "min_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


_text = st.one_of(st.text(max_size=12), st.sampled_from(["<image>", "\ud800", "lung", "nan,1", "-1,0", ""]))
_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), _text),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(_text, inner, max_size=3)), max_leaves=8)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(_text, _json)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
        _json, st.fixed_dictionaries({"url": st.sampled_from(["data:image/png;base64,AAAA", "file:///etc/passwd",
                                                              "http://x", "data:,", "file://%00", "x"])},
                                     optional={"window": _json, "frame": _json}))}),
    _json)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3])},
                                 optional={"content": st.one_of(_text, st.lists(_part, max_size=3), _json)})
_request = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(_message, max_size=3), _json)},
    optional={k: _json for k in ("temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed",
                                 "stop", "stream", "stream_options", "n", "min_tokens", "repetition_penalty",
                                 "model")})


def test_fuzzed_requests_never_get_a_5xx(running):
    url, proc, log, _ = running
    statuses: list[int] = []
    with httpx.Client(timeout=60, headers={"Content-Type": "application/json"}) as h:

        @settings(max_examples=600, derandomize=True, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(_request)
        def one(body):
            if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
                body["max_tokens"] = max(1, min(body["max_tokens"], 4))
            body.setdefault("max_tokens", 2)
            body.pop("max_completion_tokens", None)
            r = h.post(f"{url}/v1/chat/completions", content=json.dumps(body, allow_nan=True).encode())
            statuses.append(r.status_code)
            assert r.status_code < 500, (body, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        one()
    print(f"fuzz: {len(statuses)} requests, statuses {sorted(set(statuses))}")
    assert len(statuses) >= 500
    assert httpx.get(f"{url}/health").json()["status"] == "ok" and proc.poll() is None
    assert "Traceback" not in log.read_text()


# --- 10. shutdown ---------------------------------------------------------------------------------------


def test_shutdown_tells_every_client(model, tmp_path):
    # 30000 tokens: four times what the tiny model decodes in the 10 s grace here, so the stream is cut.
    with server(str(model.manifest_path), tmp_path, "--parallel", "1", "--max-queue", "8", "--ctx", "32768") as (
            url, proc, log):
        long = {"messages": [user("Write a long report.")], "max_tokens": 30000, "min_tokens": 30000,
                "temperature": 0.8}
        outcomes: dict[str, object] = {}

        def streaming() -> None:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**long, "stream": True},
                              timeout=60) as r:
                outcomes["stream"] = [line for line in r.iter_lines() if line.startswith("data:")]

        def whole(name: str) -> None:
            r = httpx.post(f"{url}/v1/chat/completions", json=long, timeout=60)
            outcomes[name] = (r.status_code, r.headers.get("content-type"), r.text)

        threads = [threading.Thread(target=streaming)] + [threading.Thread(target=whole, args=(f"q{i}",))
                                                        for i in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        deadline = time.time() + 30
        while httpx.get(f"{url}/health").json().get("queued") != 2:
            assert time.time() < deadline
            time.sleep(0.05)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(30) == 0 and time.time() - t0 < 12
    for name in ("q0", "q1"):  # waiting in the queue: told at once, in OpenAI's shape
        status, ctype, text = outcomes[name]
        assert status == 503 and ctype == "application/json", outcomes[name]
        assert json.loads(text)["error"]["code"] == "shutting_down"
    events = outcomes["stream"]
    assert events[-1] == "data: [DONE]"
    # The streamed answer (30000 tokens, far more than the 10 s grace allows) is cut: an error event in OpenAI's
    # shape says why. (A stream that simply finished is not this test's case: it cannot finish in time.)
    assert any('"shutting_down"' in e for e in events), events[-3:]
    assert "Traceback" not in log.read_text() and "CancelledError" not in log.read_text()


def test_openai_client_sees_shutdown_as_503(model, tmp_path):
    with server(str(model.manifest_path), tmp_path, "--parallel", "1", "--ctx", "65536") as (url, proc, log):
        c = client(url, "none")
        # Longer than the 8 s of grace a stopping server gives an answer in flight, even for the tiny model.
        long = dict(model="tiny", messages=[user("Write a long report.")], max_tokens=60000,
                    extra_body={"min_tokens": 60000}, temperature=0.8)
        caught: list[BaseException] = []

        def whole() -> None:
            try:
                c.chat.completions.create(**long)
            except openai.APIStatusError as exc:
                caught.append(exc)

        t = threading.Thread(target=whole)
        t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(30) == 0
    assert len(caught) == 1 and caught[0].status_code == 503 and caught[0].body["code"] == "shutting_down"
