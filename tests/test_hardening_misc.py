"""Smaller defects from the hardening review: offline guard, help texts, context size, finalizer,
the chat template, and llama.cpp's log callback after an in-process quantize."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, run_cli
from PIL import Image
from tiny_models import TinySpec

GUARD_EVENTS = {
    "connect": "socket.create_connection(('203.0.113.1', 80), timeout=1)",
    "getaddrinfo": "socket.getaddrinfo('huggingface.co', 443)",
    "gethostbyname": "socket.gethostbyname('huggingface.co')",
    "gethostbyname_ex": "socket.gethostbyname_ex('huggingface.co')",
    "gethostbyaddr": "socket.gethostbyaddr('203.0.113.1')",
    "getnameinfo": "socket.getnameinfo(('203.0.113.1', 80), 0)",
    "udp_sendto": "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('203.0.113.1', 53))",
    "udp_sendmsg": "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendmsg([b'x'], [], 0, ('203.0.113.1', 53))",
    "ipv6_connect": "socket.socket(socket.AF_INET6).connect(('2001:db8::1', 80))",
}
LOCAL_EVENTS = {
    "udp_loopback": "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0)); "
                    "u.sendto(b'x', u.getsockname())",
    "resolve_localhost": "socket.gethostbyname('localhost')",
    "tcp_loopback": "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1); "
                    "socket.create_connection(s.getsockname(), timeout=1).close()",
}


def _run_guarded(statement: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import socket
        from huatuo_local.runtime.core.offline import forbid_network, NetworkBlocked
        forbid_network()
        try:
            {statement}
        except NetworkBlocked as e:
            print("BLOCKED", e)
        except OSError as e:
            print("REACHED-OS", type(e).__name__)
        else:
            print("ALLOWED")
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("event", sorted(GUARD_EVENTS))
def test_the_offline_guard_refuses_every_network_event(event):
    proc = _run_guarded(GUARD_EVENTS[event])
    assert proc.stdout.startswith("BLOCKED") and "runs offline" in proc.stdout, (event, proc.stdout, proc.stderr)


@pytest.mark.parametrize("event", sorted(LOCAL_EVENTS))
def test_the_offline_guard_allows_loopback(event):
    proc = _run_guarded(LOCAL_EVENTS[event])
    assert proc.stdout.startswith("ALLOWED"), (event, proc.stdout, proc.stderr)


def test_a_cluster_replica_reaches_its_cluster_and_nothing_else():
    """serve --ray: a replica's guard also passes its cluster's machines (runtime/cluster/replica.py), no other."""
    cluster = "from huatuo_local.runtime.core.offline import allow_hosts; allow_hosts(['203.0.113.1']); "
    reached = _run_guarded(cluster + "socket.create_connection(('203.0.113.1', 9), timeout=0.2)")
    assert reached.stdout.startswith(("REACHED-OS", "ALLOWED")), reached.stdout + reached.stderr
    beyond = _run_guarded(cluster + "socket.create_connection(('203.0.113.2', 9), timeout=0.2)")
    assert beyond.stdout.startswith("BLOCKED"), beyond.stdout + beyond.stderr


def test_the_guard_sets_the_hub_offline_even_when_already_imported():
    code = textwrap.dedent("""
        import os
        import huggingface_hub.constants as c
        assert not c.HF_HUB_OFFLINE
        from huatuo_local.runtime.core.offline import forbid_network
        forbid_network()
        print(c.HF_HUB_OFFLINE, os.environ["HF_HUB_OFFLINE"], os.environ["TRANSFORMERS_OFFLINE"])
    """)
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.stdout.split() == ["True", "1", "1"], proc.stdout + proc.stderr


COMMANDS = ("convert", "chat", "doctor", "pull", "list", "info", "rm", "verify", "preview", "cache info",
            "cache clear", "serve")


def test_help_texts_keep_their_words_and_flags_have_sane_names():
    for cmd in COMMANDS:
        proc = run_cli(*cmd.split(), "--help")
        assert proc.returncode == 0, cmd
        text = proc.stdout
        assert "Example" in text and f"huatuo-local {cmd}" in " ".join(text.split()), cmd
        assert "--no-no-" not in text, cmd
        assert "the  extra" not in text, cmd
        usage = text.splitlines()[0]
        assert usage.startswith(f"Usage: huatuo-local {cmd}") and "{" not in usage, usage  # CHECKPOINT, not {src}
        assert "<list[" not in text and "Path>" not in text, cmd  # no Python types beside arguments
    verify = run_cli("verify", "--help").stdout
    assert "huatuo-local[verify]" in verify
    chat = " ".join(run_cli("chat", "--help").stdout.split())
    for flag in ("--no-mmproj-offload", "--no-prefix-cache", "--allow-unverified-vision"):
        assert flag in chat


def test_default_context_holds_the_releases_limits(converted, tmp_path):
    """6 images (576 positions each), a long question and history: more than the old 4096."""
    from huatuo_local import HuatuoChatbot

    paths = []
    for i in range(6):
        p = tmp_path / f"i{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    long_question = " ".join(["Describe the lesion in the left lower lobe and its margins."] * 60)
    with HuatuoChatbot(converted(TinySpec(seed=8, tower="folder")).manifest_path, temperature=0,
                       max_new_tokens=4, prefix_cache=False) as bot:
        reply = bot.session.ask(long_question, paths)
        assert reply.prompt_positions > 4096
        assert bot.engine.options.n_ctx == 8192


def test_a_discarded_chatbot_frees_its_engine(converted, monkeypatch):
    from huatuo_local.runtime.engine import engine as engine_mod

    from huatuo_local import HuatuoChatbot

    freed = []
    real = engine_mod.mtmd_lib

    class Spy:
        def __getattr__(self, name):
            if name == "mtmd_free":
                return lambda ctx: (freed.append(ctx), real().mtmd_free(ctx))
            return getattr(real(), name)

    monkeypatch.setattr(engine_mod, "mtmd_lib", lambda: Spy())
    bot = HuatuoChatbot(converted().manifest_path, prefix_cache=False)
    ctx = bot.engine.mtmd_ctx
    del bot
    gc.collect()
    assert ctx in freed


def test_the_gguf_chat_template_renders_exactly_render_prompt(converted):
    from huatuo_local.models.gguf_check import read_fields
    from huatuo_local.models.prompt import MEDIA_MARKER, Turn, render_prompt
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = read_fields(converted().llm_path, ("tokenizer.chat_template",))["tokenizer.chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders it
    compiled = env.from_string(template)
    conversations = [
        [Turn("What does the picture show?", 1)],
        [Turn("  Describe <image> this </s> scan <s> ", 2, "A chest CT."), Turn("Any nodules?", 0)],
        [Turn("这是什么器官？", 1, "肝脏。"), Turn("有病变吗？", 1, "没有。"), Turn("Summarise in English.", 0)],
        [Turn("", 3)],
    ]
    for turns in conversations:
        messages = []
        for t in turns:
            parts = [{"type": "image"}] * t.n_images + [{"type": "text", "text": t.text}]
            messages.append({"role": "user", "content": parts if t.n_images else t.text})
            if t.answer is not None:
                messages.append({"role": "assistant", "content": t.answer})
        assert compiled.render(messages=messages) == render_prompt(turns, MEDIA_MARKER), turns


def test_quantize_gives_back_the_runtimes_log_callback(tiny, tmp_path):
    """After an in-process quantize, llama.cpp's errors still reach the runtime's error list."""
    from huatuo_local.convert.pipeline import convert
    from huatuo_local.runtime.engine import engine as engine_mod
    from huatuo_local.runtime.engine.engine import Engine, EngineError, EngineOptions
    from huatuo_local.runtime.llama.logs import LAST_ERRORS, quiet_logs

    quiet_logs()
    convert(tiny(TinySpec(seed=8, tower="folder"))["ckpt"], tmp_path, quant="Q4_K_M", name="t")
    LAST_ERRORS.clear()
    broken = tmp_path / "broken.gguf"
    data = (tmp_path / "t-Q4_K_M.gguf").read_bytes()
    broken.write_bytes(data[: len(data) - 64])  # the header is intact; the last tensor's data is cut
    with pytest.raises(EngineError, match="not within the file"):
        # Skip our own pre-check so that llama.cpp's loader reports the damage through the log.
        orig = engine_mod.check_gguf
        engine_mod.check_gguf = lambda p, e=None: orig(tmp_path / "t-Q4_K_M.gguf", e) if p == broken else orig(p, e)
        try:
            Engine(broken, tmp_path / "mmproj-t-f16.gguf", EngineOptions(n_ctx=256))
        finally:
            engine_mod.check_gguf = orig
    assert any("error loading model" in e for e in LAST_ERRORS), "llama.cpp's error did not reach the runtime"


def test_a_failed_turn_leaves_the_conversation_as_it_was(converted, tmp_path, monkeypatch):
    from huatuo_local.models.errors import HuatuoError
    from huatuo_local.runtime.engine import probe

    from huatuo_local import HuatuoChatbot

    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(5).random((40, 50, 3)) * 255).astype(np.uint8)).save(img)
    with HuatuoChatbot(converted().manifest_path, temperature=0, max_new_tokens=4, prefix_cache=False) as bot:
        bot.chat("Hello.")
        failing = probe.ProbeResult(ok=False, verdict="class-token-last", library="libmtmd.so", max_abs_diff=1.0,
                                    scale=1.0, detail="simulated")
        monkeypatch.setattr(probe, "check_library", lambda use_cache=True: failing)
        with pytest.raises(HuatuoError, match="encodes LLaVA images wrongly"):
            bot.chat("What is this?", [str(img)])
        assert [t.text for t in bot.session.turns] == ["Hello."] and bot.session.images == []
        monkeypatch.undo()
        assert bot.chat("And now?") is not None and len(bot.session.turns) == 2


def test_threads_default_to_physical_cores_and_doctor_says_so():
    from huatuo_local.runtime.engine.engine import EngineOptions, physical_cores

    smt = "".join(f"processor\t: {i}\nphysical id\t: {i // 4}\ncore id\t\t: {(i % 4) // 2}\n\n" for i in range(8))
    assert physical_cores(smt) == 4  # 2 sockets x 2 cores, 2 threads each
    assert EngineOptions().threads == physical_cores()
    import psutil

    proc = run_cli("doctor", "--json")
    report = json.loads(proc.stdout)
    # Counted independently (psutil reads the topology its own way), not by the function under test.
    assert report["physical_cores"] == psutil.cpu_count(logical=False)
    assert report["logical_cores"] == psutil.cpu_count(logical=True)
    assert report["recommended"]["threads"] == psutil.cpu_count(logical=False)


def test_a_config_that_makes_nan_is_refused_and_nan_scores_end_one_answer(tiny, converted, tmp_path):
    """Issue 36: rope_theta <= 0 was accepted by convert, and the NaN logits it gives crashed sampling (a chat
    traceback, a 500 without a word). The config is refused; a model that still gives NaN (a damaged file) ends
    that answer with one line, in chat and in serve, and the server stays up."""
    import shutil

    import httpx
    from gguf import GGUFReader
    from test_serve import server
    from tiny_models import TinySpec

    for bad in (0.0, -10000.0):
        spec = TinySpec(seed=31, extra_config={"rope_theta": bad})
        proc = run_cli("convert", str(tiny(spec)["ckpt"]), "-o", str(tmp_path / "out"), "--quant", "F32")
        assert proc.returncode == 1 and proc.stderr.strip().endswith(
            f"rope_theta is {bad!r}; it must be a positive number (the config is damaged)"), proc.stderr
    model = converted()
    folder = tmp_path / "nan"
    shutil.copytree(model.manifest_path.parent, folder)
    damaged = folder / model.llm_path.name
    norm = next(t for t in GGUFReader(str(damaged)).tensors if t.name == "output_norm.weight")
    with open(damaged, "r+b") as f:  # the final norm's weights set to NaN: every score is NaN
        f.seek(int(norm.data_offset))
        f.write(np.full(int(norm.n_elements), np.nan, np.float32).tobytes())
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    proc = run_cli("chat", str(image), "-p", "hi", "--model", str(folder / model.manifest_path.name),
                   "--no-prefix-cache")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: the model produced NaN scores"), \
        proc.stderr
    with server(str(folder / model.manifest_path.name), tmp_path) as (url, _, _):
        for stream in (False, True):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream})
            if stream:  # the stream started: the error arrives as an event in OpenAI's shape
                assert r.status_code == 200 and '"code": "model_output_invalid"' in r.text.replace('":"', '": "'), \
                    r.text
            else:
                assert r.status_code == 500 and r.json()["error"]["code"] == "model_output_invalid", r.text
        assert httpx.get(f"{url}/health").status_code == 200
