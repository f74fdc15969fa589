"""`huatuo-local chat` and the Python API, driven as a user would, on tiny converted models."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI, ROOT, run_cli
from PIL import Image
from tiny_models import TinySpec

SPEC = TinySpec(arch="qwen2", seed=8, tower="folder")


@pytest.fixture(scope="module")
def model(converted):
    return converted(SPEC, "F32", "f32")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate([(300, 200), (180, 260), (336, 336), (64, 64), (90, 40), (120, 120), (50, 70)]):
        rng = np.random.default_rng(100 + i)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


def chat(model, *args, input=None, env=None, prefix_cache=False):
    extra = [] if prefix_cache else ["--no-prefix-cache"]
    return run_cli("chat", "--model", str(model.manifest_path), "--temperature", "0", *extra, *args, input=input,
                   env=env)


def repl(model_path, *args: str, env: dict | None = None, timeout: float = 60):
    """The interactive chat in a pseudo-terminal, greedy."""
    import pexpect

    return pexpect.spawn(CLI[0], [*CLI[1:], "chat", "--model", str(model_path), "--temperature", "0", *args],
                         cwd=str(ROOT), encoding="utf-8", timeout=timeout, env=dict(os.environ, TERM="dumb",
                                                                                      **(env or {})))


def leave(child) -> None:
    """Ctrl-D: the chat ends cleanly."""
    import pexpect

    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_shot_answer_matches_the_pytorch_reference(model, images, tiny):
    from reference import Reference

    ref = Reference(tiny(SPEC))
    prompt = "<|user|>\n<image>\nWhat does the picture show?\n<|assistant|>\n"
    tokens, _ = ref.generate(prompt, [images[0]], max_new_tokens=24)
    want = ref.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    proc = chat(model, images[0], "-p", "What does the picture show?", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == want
    # Nothing else: on a machine with a GPU, the one line saying where the model went.
    said = proc.stderr.splitlines()
    assert said == [] or (len(said) == 1 and said[0].startswith("GPU ")), proc.stderr


def test_question_from_stdin_and_json_output(model, images):
    proc = chat(model, images[0], "--json", "--max-tokens", "8", input="What does the picture show?\n")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == "tiny:f32"
    assert 1 <= out["tokens"]["generated"] <= 8
    assert out["tokens"]["prompt"] > 576
    assert out["counters"]["images_encoded"] == 1
    assert out["counters"]["prompt_tokens_evaluated"] == out["tokens"]["prompt"]
    assert out["counters"]["tokens_reused"] == 0
    for key in ("image_encode_s", "prompt_s", "generation_s", "first_token_s"):
        assert out["timings"][key] >= 0
    same = chat(model, images[0], "-p", "What does the picture show?", "--max-tokens", "8")
    assert same.stdout.strip() == out["answer"], "greedy answers are deterministic"


def test_sampling_is_seeded(model, images):
    a = chat(model, images[0], "-p", "Describe it.", "--temperature", "0.9", "--seed", "5", "--max-tokens", "12")
    b = chat(model, images[0], "-p", "Describe it.", "--temperature", "0.9", "--seed", "5", "--max-tokens", "12")
    c = chat(model, images[0], "-p", "Describe it.", "--temperature", "0.9", "--seed", "6", "--max-tokens", "12")
    assert a.returncode == b.returncode == c.returncode == 0
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_follow_up_reuses_the_kv_cache_through_the_api(model, images):
    from huatuo_local import HuatuoChatbot

    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=8, prefix_cache=False) as bot:
        first = bot.chat("What does the picture show?", [images[0]])
        turn1 = bot.last_reply
        second = bot.chat("Is there anything abnormal?")
        turn2 = bot.last_reply
        assert isinstance(first, str) and isinstance(second, str)
        assert turn1.counters.images_encoded == 1 and turn2.counters.images_encoded == 0
        # Everything up to the end of turn 1's prompt is reused; only the re-tokenized answer
        # (random weights make it invalid UTF-8, so it re-tokenizes differently) and turn 2 are new.
        assert turn2.counters.tokens_reused >= turn1.prompt_positions > 576
        assert turn2.counters.prompt_tokens_evaluated == turn2.prompt_positions - turn2.counters.tokens_reused
        assert turn2.counters.prompt_tokens_evaluated < 60
        assert bot.prefill_next_turn() >= 2  # what the REPL runs while the user types
        kept = bot.session.positions
        streamed = "".join(bot.stream("And the size?"))
        assert streamed.strip() == bot.last_reply.text
        assert bot.last_reply.counters.tokens_reused == kept
        assert bot.counters.images_encoded == 1
        bot.clear_history()
        again = bot.inference("What does the picture show?", [images[0]])
        assert again == [first]
        assert bot.counters.images_encoded == 1, "the same image at the same place is reused, not re-encoded"


def test_a_new_process_restores_the_image_prefix_from_disk(model, images, tmp_path):
    env = {"HUATUO_LOCAL_HOME": str(tmp_path / "home")}
    args = (images[2], "-p", "What does the picture show?", "--max-tokens", "8", "--json")
    cold = json.loads(chat(model, *args, env=env, prefix_cache=True).stdout)
    warm = json.loads(chat(model, *args, env=env, prefix_cache=True).stdout)
    assert cold["counters"]["images_encoded"] == 1 and cold["counters"]["prefix_cache_hits"] == 0
    assert warm["counters"]["images_encoded"] == 0 and warm["counters"]["prefix_cache_hits"] == 1
    assert warm["counters"]["tokens_reused"] >= 577  # "<|user|>\n" and the image
    assert warm["counters"]["prompt_tokens_evaluated"] == warm["tokens"]["prompt"] - warm["counters"]["tokens_reused"]
    assert warm["answer"] == cold["answer"]
    entries = list((tmp_path / "home" / "prefix-cache").glob("*.kv"))
    assert len(entries) == 1 and oct(entries[0].stat().st_mode & 0o777) == "0o600"
    other = json.loads(chat(model, images[3], "-p", "What does the picture show?", "--max-tokens", "8", "--json",
                            env=env, prefix_cache=True).stdout)
    assert other["counters"]["images_encoded"] == 1, "another image must not hit the cache"
    off = json.loads(chat(model, *args, env=env).stdout)
    assert off["counters"]["images_encoded"] == 1 and off["answer"] == cold["answer"]


def test_errors_are_one_line_and_exit_non_zero(model, images, tmp_path):
    text_png = tmp_path / "notes.png"
    text_png.write_text("this is not an image")
    cases = [
        ([str(tmp_path / "missing.png"), "-p", "hi"], "missing.png"),
        ([str(text_png), "-p", "hi"], "notes.png"),
        ([str(tmp_path), "-p", "hi"], "folder"),
        ([*images[:7], "-p", "hi"], "at most 6 per question"),
        ([images[0], "-p", "word " * 3000, "--ctx", "1024"], "--ctx"),
    ]
    for args, needle in cases:
        proc = chat(model, *args)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last, (args, proc.stderr)


def test_every_input_is_checked_before_the_model_loads(images, tmp_path):
    """Issue 22: one-shot and interactive chat name a bad input at once. The model named here does not
    exist, so an answer about the image (not the model) proves the image was checked first."""
    text_png = tmp_path / "notes.png"
    text_png.write_text("this is not an image")
    bogus = ["--model", str(tmp_path / "no-model-here")]
    cases = [
        ([str(tmp_path / "missing.png"), "-p", "hi"], f"error: {tmp_path / 'missing.png'}: no such file"),
        ([str(tmp_path / "missing.png")], f"error: {tmp_path / 'missing.png'}: no such file"),  # the REPL
        ([str(text_png)], "notes.png: not an image in a supported format"),
        (["what", "is", "this", "-p", "hi"], "error: what: no such file"),  # a question taken for paths
        ([*images[:7], "-p", "hi"], "error: 7 images: the release takes at most 6 per question"),
        ([images[0], "-p", ""], "error: -p: the question is empty"),
        ([images[0], "-p", "hi", "--max-tokens", "0"], "error: --max-tokens must be from 1"),
        ([images[0], "-p", "hi", "--max-tokens", "-5"], "error: --max-tokens must be from 1"),
        ([images[0], "-p", "hi", "--temperature", "-1"], "error: --temperature must be from 0 to 2 (got -1.0)"),
        ([images[0], "-p", "hi", "--repeat-penalty", "0"], "error: --repeat-penalty must be from 0.01"),
    ]
    for args, needle in cases:
        proc = run_cli("chat", *args, *bogus, input="")
        assert proc.returncode == 1, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)
        assert not proc.stderr.startswith("\n")


def test_the_repl_checks_images_as_they_are_added(model, images, tmp_path):
    """`/image` reads the file at once (a text file, a folder, a 7th image fail there), takes quoted and
    drag-and-drop paths, and `/images` / `/drop` manage what waits; `/save` names images and stopped turns."""

    spaced = tmp_path / "my scan.png"
    spaced.write_bytes(Path(images[0]).read_bytes())
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    child = repl(model.manifest_path, "--max-tokens", "4", "--no-prefix-cache")
    child.expect(">>> ")
    for command, answer in [
        (f"/image {notes}", "not an image in a supported format"),
        (f"/image {tmp_path}", "no DICOM images in this folder"),
        (f'/image "{spaced}"', "image added"),
        (f"/image {str(spaced).replace(' ', chr(92) + ' ')}", "image added"),  # my\ scan.png
        ("/images", "2. " + str(spaced)),
        ("/drop 5", "/drop N: N is 1 to 2"),
        ("/drop", "dropped"),
        ("/images", "1. " + str(spaced)),
    ]:
        child.sendline(command)
        child.expect_exact(answer)
        child.expect(">>> ")
    for path in images[1:6]:
        child.sendline(f"/image {path}")
        child.expect(">>> ")
    child.sendline(f"/image {images[6]}")
    child.expect_exact("holds at most 6 images")
    child.expect(">>> ")
    child.sendline("What do they show?")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 't.md'}")
    child.expect("saved")
    child.expect(">>> ")
    leave(child)
    saved = (tmp_path / "t.md").read_text()
    assert "**User** (my scan.png, img1.png, img2.png, img3.png, img4.png, img5.png): What do they show?" in saved


def test_model_errors(model, images, tmp_path, converted):
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_text("hello")
    (tmp_path / "mmproj-fake.gguf").write_text("hello")
    other = converted(TinySpec(arch="llama", hidden=96, heads=4, kv_heads=2, seed=4, tower="folder"), "F16", "f16")
    mismatched = tmp_path / "mix"
    mismatched.mkdir()
    os.symlink(model.llm_path, mismatched / "tiny-F32.gguf")
    os.symlink(other.mmproj_path, mismatched / "mmproj-other-f16.gguf")
    env = {"HUATUO_LOCAL_HOME": str(tmp_path / "home")}
    cases = [
        (["--model", str(not_gguf)], "not a GGUF file"),
        (["--model", "huatuo-vision-7b"], "huatuo-local pull huatuo-vision-7b"),
        ([], "huatuo-local pull huatuo-vision-7b"),
        (["--model", "no-such-model"], "not installed"),
        (["--model", str(mismatched / "tiny-F32.gguf")], "96-wide"),
    ]
    for args, needle in cases:
        proc = run_cli("chat", images[0], "-p", "hi", *args, env=env)
        assert proc.returncode != 0, args
        last = proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr and last.startswith("error: ") and needle in last, (args, last)


def test_chat_makes_no_network_access(model, images, tmp_path):
    """An audit hook in a sitecustomize records every connection attempt of the process."""
    log = tmp_path / "net.log"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        def _record(event, args):
            if event in ("socket.connect", "socket.getaddrinfo"):
                with open({str(log)!r}, "a") as f:
                    f.write(event + " " + repr(args[1:] if event == "socket.connect" else args[:2]) + "\\n")
        sys.addaudithook(_record)
    """))
    env = {"PYTHONPATH": str(site), "HF_ENDPOINT": "http://203.0.113.1:9"}
    proc = chat(model, images[0], "-p", "What does the picture show?", "--max-tokens", "4", env=env)
    assert proc.returncode == 0, proc.stderr
    assert not log.exists() or log.read_text() == "", log.read_text()


def test_the_offline_guard_refuses_outside_addresses():
    code = textwrap.dedent("""
        import socket
        from huatuo_local.runtime.core.offline import forbid_network, NetworkBlocked
        forbid_network()
        try:
            socket.create_connection(("203.0.113.1", 80), timeout=1)
        except NetworkBlocked as e:
            print("blocked:", e)
        try:
            socket.getaddrinfo("huggingface.co", 443)
        except NetworkBlocked as e:
            print("blocked:", e)
        s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
        c = socket.create_connection(s.getsockname(), timeout=1); print("loopback ok"); c.close()
    """)
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.count("blocked:") == 2 and "loopback ok" in proc.stdout, proc.stdout + proc.stderr


def test_interactive_session_in_a_terminal(model, images, tmp_path):

    child = repl(model.manifest_path, "--max-tokens", "400", images[0])
    child.expect(">>> ")
    child.sendline("/help")
    child.expect("/image PATH")
    child.expect(">>> ")
    child.sendline("What does the picture show?")
    child.expect(">>> ")
    child.sendline(f"/image {images[1]}")
    child.expect("image added")
    child.expect(">>> ")
    # A long answer, interrupted: the session must survive and answer again.
    child.sendline("Describe everything in detail.")
    child.expect("Describe everything in detail.\r\n")  # the terminal's echo
    child.expect(r"\S", timeout=30)  # the answer has started
    child.sendintr()
    child.expect(r"answer stopped")
    child.expect(">>> ")
    child.sendline(f"/image {tmp_path / 'nope.png'}")
    child.expect("error: .*nope.png: no such file")
    child.expect(">>> ")
    transcript = tmp_path / "t.json"
    child.sendline(f"/save {transcript}")
    child.expect("saved")
    child.expect(">>> ")
    child.sendline("/clear")
    child.expect("cleared")
    child.expect(">>> ")
    leave(child)
    saved = json.loads(transcript.read_text())
    assert [t["images"] for t in saved["turns"]] == [["img0.png"], ["img1.png"]]
    assert [t["stopped"] for t in saved["turns"]] == [False, True]  # the interrupted answer says so
    assert saved["turns"][0]["user"] == "What does the picture show?"
    assert saved["turns"][1]["user"] == "Describe everything in detail."


def test_images_are_read_while_the_question_is_typed(model, images):
    """Issue 16: the next turn's images are encoded and evaluated before its question exists; answers
    stay those of a fresh one-shot chat, also when the question comes before that work ends, or after
    the conversation was cleared or another image added meanwhile."""
    import threading

    from huatuo_local import HuatuoChatbot

    question = "What does the picture show?"
    want = json.loads(chat(model, images[0], "-p", question, "--json", "--max-tokens", "8").stdout)["answer"]
    other = json.loads(chat(model, images[3], "-p", question, "--json", "--max-tokens", "8").stdout)["answer"]
    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=8, prefix_cache=False) as bot:
        assert bot.prefill_images([images[0]]) >= 576
        encoded = bot.counters.images_encoded
        assert bot.prefill_images([images[0]]) == 0  # already there: nothing evaluated, not encoded again
        assert bot.counters.images_encoded == encoded
        assert bot.chat(question, [images[0]]) == want
        assert bot.last_reply.counters.images_encoded == 0  # read before the question was asked
        assert bot.last_reply.counters.prompt_tokens_evaluated < 40
        # The question arrives while the image is still being read.
        bot.clear_history()
        t = threading.Thread(target=bot.prefill_images, args=([images[0]],))
        t.start()
        assert bot.chat(question, [images[0]]) == want
        t.join()
        # Cleared, or another image picked, while the reading runs: the answer is the other image's.
        bot.clear_history()
        t = threading.Thread(target=bot.prefill_images, args=([images[1]],))
        t.start()
        bot.clear_history()
        assert bot.chat(question, [images[3]]) == other
        t.join()


def test_the_repl_reads_the_image_before_the_question(model, images):

    question = "What does the picture show?"
    want = json.loads(chat(model, images[2], "-p", question, "--json", "--max-tokens", "8").stdout)["answer"]
    child = repl(model.manifest_path, "--max-tokens", "8", "--no-prefix-cache", images[2])
    child.expect(">>> ")
    child.sendline(question)  # at once: possibly before the background reading ends
    child.expect_exact(question + "\r\n")
    child.expect(">>> ")
    assert child.before.strip() == want
    child.sendline(f"/image {images[0]}")
    child.expect("image added")
    child.expect(">>> ")
    leave(child)


def test_the_repl_answers_when_its_image_is_already_in_the_prefix_cache(model, images, tmp_path):
    """Issue 22: the second REPL over the same image restored it from disk and then spun at 100 % CPU."""

    question = "What does the picture show?"
    env = {"HUATUO_LOCAL_HOME": str(tmp_path / "home")}
    want = json.loads(chat(model, images[2], "-p", question, "--json", "--max-tokens", "8").stdout)["answer"]
    for run in range(2):  # the first run fills the prefix cache, the second reads the image from it
        child = repl(model.manifest_path, "--max-tokens", "8", images[2], env=env)
        child.expect(">>> ")
        time.sleep(1.0)  # let the background reading finish (a cache hit on the second run)
        child.sendline(question)
        child.expect_exact(question + "\r\n")
        child.expect(">>> ")
        assert child.before.strip() == want, f"run {run}"
        child.sendline(f"/image {images[2]}")  # the same image again: all of it is already held
        child.expect("image added")
        child.expect(">>> ")
        child.sendline("And now?")
        child.expect_exact("And now?\r\n")
        child.expect(">>> ")
        leave(child)
    assert list((tmp_path / "home" / "prefix-cache").glob("*.kv")), "the first run saved the image's prefix"


def test_prefill_images_returns_for_every_already_cached_case(model, images, tmp_path, monkeypatch):
    """Every "already there" path of the scheduler ends its job: from disk, from the slot, twice in a row."""
    from huatuo_local import HuatuoChatbot

    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(tmp_path / "home"))
    question = "What does the picture show?"
    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=8) as bot:
        assert bot.prefill_images([images[1]]) > 576
        want = bot.chat(question, [images[1]])
    results: list = []
    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=8) as bot:  # a new process's view
        t = threading.Thread(target=lambda: results.append(bot.prefill_images([images[1]])), daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive(), "prefill_images of an image restored from disk never returned"
        assert results == [0] and bot.counters.prefix_cache_hits == 1
        assert bot.prefill_images([images[1]]) == 0  # the slot holds it already
        assert bot.chat(question, [images[1]]) == want
        assert bot.last_reply.counters.images_encoded == 0


def test_progress_on_a_terminal_and_none_when_piped(model, images):
    """Issue 16: a status line on stderr while the model loads and reads the image; gone when the answer
    starts, and never in piped or --json output."""
    import pexpect

    question = "What does the picture show?"
    want = json.loads(chat(model, images[1], "-p", question, "--json", "--max-tokens", "6").stdout)["answer"]
    child = pexpect.spawn(CLI[0], [*CLI[1:], "chat", "--model", str(model.manifest_path), "--temperature", "0",
                                   "--max-tokens", "6", "--no-prefix-cache", images[1], "-p", question],
                          cwd=str(ROOT), encoding="utf-8", timeout=60, env=dict(os.environ, TERM="xterm-256color"))
    child.expect(pexpect.EOF)
    child.close()
    screen = child.before
    assert child.exitstatus == 0, screen
    assert "loading " in screen and ("reading the prompt" in screen or "encoding the image" in screen), screen
    assert want in screen
    piped = chat(model, images[1], "-p", question, "--max-tokens", "6")
    assert piped.returncode == 0 and piped.stdout.strip() == want
    assert "loading" not in piped.stderr and "reading the prompt" not in piped.stderr and "encoding" not in piped.stderr


def test_cancel_stops_a_long_decode_at_once_and_the_cache_stays_consistent(tiny, tmp_path):
    """Issue 16: Ctrl-C inside a long llama_decode (a 2048-position chunk here, a 256-position chunk of a
    7B on a laptop) stops between operations, not at the chunk's end; what it left is removed."""
    import time

    import numpy as np
    from huatuo_local.convert.pipeline import convert
    from huatuo_local.runtime.core.sampling import SamplingParams
    from huatuo_local.runtime.core.scheduler import Job
    from huatuo_local.runtime.core.session import Session
    from huatuo_local.runtime.engine.engine import Engine, EngineOptions

    spec = TinySpec(seed=3, hidden=1024, layers=4, heads=8, kv_heads=4, ffn=4096, tower="folder")
    m = convert(tiny(spec)["ckpt"], tmp_path, quant="Q8_0", mmproj_type="f32", name="mid")
    params = SamplingParams(temperature=0, max_new_tokens=6)

    def session() -> Session:
        # On the CPU also on a GPU machine: the abort is measured against the CPU work of a chunk.
        return Session(Engine(m.llm_path, m.mmproj_path, EngineOptions(n_ctx=4096, n_gpu_layers=0),
                              eos_id=m.manifest.eos_id),
                       params)

    fresh = session()
    want = fresh.ask("What does the picture show?").tokens
    fresh.close()
    s = session()
    s.scheduler.chunk = 2048  # one decode of 2048 positions: seconds on this CPU
    long = [int(t) for t in np.random.default_rng(0).integers(10, 300, 2040)]
    # Work, not wall time (a busy machine, or one with many cores): this process's CPU seconds, all threads.
    c0 = time.process_time()
    full = s.scheduler.submit(Job(long, SamplingParams(temperature=0, max_new_tokens=1))).wait()
    whole = time.process_time() - c0
    assert full.finish_reason in ("stop", "length") and whole > 0.6, whole  # the test means something
    s.scheduler.slots[0].cached, s.scheduler.slots[0].pos = [], 0
    s.engine.seq_rm(0, 0)
    c0 = time.process_time()
    job = s.scheduler.submit(Job(list(reversed(long)), params))
    while time.process_time() - c0 < whole / 5:  # a fifth of the chunk's work done
        time.sleep(0.01)
    c1 = time.process_time()
    job.cancel()
    result = job.wait()
    after = time.process_time() - c1
    # Without the abort the chunk runs to its end: four fifths of its work more.
    assert result.finish_reason == "cancelled" and after < whole / 3, (after, whole)
    assert s.scheduler.slots[0].pos == len(s.scheduler.slots[0].cached)  # the partial chunk is gone
    assert s.ask("What does the picture show?").tokens == want
    s.close()


def test_ctrl_c_while_the_repl_reads_images_returns_at_once_and_the_next_answer_is_right(tiny, images, tmp_path):
    """Issue 16: the question is sent while the REPL still reads five images in the background; Ctrl-C
    returns to the prompt within a second, and the question asked again gets the one-shot answer."""
    import time

    from huatuo_local.convert.pipeline import convert

    spec = TinySpec(seed=5, hidden=1024, layers=8, heads=8, kv_heads=4, ffn=4096, tower="folder")
    m = convert(tiny(spec)["ckpt"], tmp_path / "mid", quant="Q8_0", mmproj_type="f32", name="mid")
    pics = images[:5]
    question = "What do the pictures show?"
    # On the CPU also where there is a GPU: the reading must take seconds for Ctrl-C to land inside it.
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    one_shot = json.loads(chat(m, *pics, "-p", question, "--json", "--max-tokens", "6", "-ngl", "0").stdout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    work = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # CPU s, mostly the reading
    assert work > 2.0, work  # enough work for the bound below to mean something
    child = repl(m.manifest_path, "--max-tokens", "6", "--no-prefix-cache", "-ngl", "0", *pics, timeout=120)
    child.expect(">>> ")
    child.sendline(question)  # the five images are still being read
    child.expect_exact(question + "\r\n")

    def cpu() -> float:  # the chat's CPU seconds so far (all its threads)
        fields = open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    c0 = cpu()
    while cpu() - c0 < 0.3:  # the question is in, and the reading goes on
        time.sleep(0.05)
    c0 = cpu()
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact(">>> ")
    # Work, not wall time: after Ctrl-C the chat stops reading, instead of finishing the five images' work.
    assert cpu() - c0 < work / 3, (cpu() - c0, work)
    child.sendline(question)
    child.expect_exact(question + "\r\n")
    child.expect_exact(">>> ")
    assert child.before.strip() == one_shot["answer"].strip()
    leave(child)


def test_kv_type_reaches_llama_cpp(converted, images):
    """--kv-type (never tested before issue 22, and q8_0 never worked: llama.cpp keeps a quantized V cache
    only with flash attention). llama.cpp's own log says which types it allocated."""
    wide = converted(TinySpec(arch="qwen2", seed=8, tower="folder", hidden=128, heads=4, kv_heads=2), "F32", "f32")
    for kv, want in (("q8_0", "K (q8_0)"), ("f32", "K (f32)"), ("f16", "K (f16)")):
        proc = run_cli("chat", images[0], "-p", "hi", "--model", str(wide.manifest_path), "--kv-type", kv,
                       "--max-tokens", "3", "--temperature", "0", "--no-prefix-cache",
                       env={"HUATUO_LOCAL_VERBOSE": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert want in proc.stderr and f"V ({kv})" in proc.stderr, kv
    # A head too narrow for q8_0's 32-value blocks: llama.cpp's reason, in one line.
    narrow = run_cli("chat", images[0], "-p", "hi", "--model", str(converted(SPEC, "F32", "f32").manifest_path),
                     "--kv-type", "q8_0", "--no-prefix-cache")
    assert narrow.returncode == 1 and "does not divide n_embd_head_k" in narrow.stderr
    assert len(narrow.stderr.strip().splitlines()) == 1
    bad = run_cli("chat", images[0], "-p", "hi", "--model", str(wide.manifest_path), "--kv-type", "q4")
    assert bad.returncode == 1 and "--kv-type q4: choose f16, f32 or q8_0" in bad.stderr


def test_a_pasted_question_of_several_lines_is_one_question(model, images, tmp_path):
    """Issue 33: the chat split a multi-line paste into separate questions (three answers, the image with the
    first only). Lines that arrive together are one question; so are the lines between two \"\"\"."""
    from huatuo_local.runtime.cli.terminal import shown
    from pydicom.data import get_testdata_file

    pasted = "Line one of the history.\nLine two.\nWhat does the picture show?"
    want = json.loads(chat(model, images[0], "-p", pasted, "--json", "--max-tokens", "8").stdout)["answer"]
    ct = get_testdata_file("CT_small.dcm")
    lung = json.loads(chat(model, ct, "-p", "And this one?", "--json", "--max-tokens", "8", "--window",
                           "lung").stdout)["answer"]
    child = repl(model.manifest_path, "--max-tokens", "8", "--no-prefix-cache", images[0])
    child.expect(">>> ")
    child.send(pasted + "\n")  # one write, as a terminal delivers a paste
    child.expect(">>> ")
    assert shown(want) in child.before  # (a terminal shows control characters as pictures: see below)
    child.sendline("/clear")
    child.expect(">>> ")
    # /image takes this image's own window (it said "no such file" for `--window lung`).
    child.sendline(f"/image {ct} --window lung")
    child.expect("image added")
    child.expect(">>> ")
    child.sendline('"""And this one?')
    child.expect(r"\.\.\. ")
    child.sendline('"""')
    child.expect(">>> ")
    assert shown(lung) in child.before
    child.sendline(f"/image {ct} --window nowhere")
    child.expect("error: --window nowhere: give a preset")
    child.expect(">>> ")
    saved = tmp_path / "t.json"
    child.sendline(f"/save {saved}")
    child.expect("saved")
    child.expect(">>> ")
    leave(child)
    turns = json.loads(saved.read_text())["turns"]
    assert [(t["user"], t["images"]) for t in turns] == [("And this one?", ["CT_small.dcm"])]


def test_control_characters_in_an_answer_are_shown_not_executed(model, tmp_path, monkeypatch):
    """Issue 33: a raw carriage return (or escape sequence) in the model's output overwrote the screen, so the
    terminal showed something else than the saved transcript."""
    import io

    from huatuo_local.runtime.cli import repl

    from huatuo_local import HuatuoChatbot

    raw = "Left\rRight \x1b[2J done"
    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=40, prefix_cache=False) as bot:
        forced = iter(bot.engine.tokenizer.tokenize(raw))

        def steer(logits):
            logits.fill(-1e9)
            logits[next(forced, bot.engine.eos_id)] = 1e4
            return logits

        bot.session.logit_hook = steer
        saved = tmp_path / "t.md"
        monkeypatch.setattr("sys.stdin", io.StringIO(f"Say it.\n/save {saved}\n"))
        out = io.StringIO()
        assert repl.run(bot, [], out=out) == 0
    assert "Left␍Right ␛[2J done" in out.getvalue() and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert raw in saved.read_bytes().decode()  # the transcript keeps the exact text


def test_the_python_api_takes_pil_images_and_arrays(model, images):
    """Issue 33: a PIL image or numpy array gave a raw TypeError; the release's users pass either."""
    from huatuo_local.models.errors import HuatuoError

    from huatuo_local import HuatuoChatbot

    question = "What does the picture show?"
    picture = Image.open(images[0])
    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=8, prefix_cache=False) as bot:
        want = bot.inference(question, [images[0]])
        assert bot.inference(question, [picture]) == want
        assert bot.inference(question, [np.asarray(picture.convert("RGB"))]) == want
        with pytest.raises(HuatuoError, match=r"a numpy array of shape \(2, 3, 5\).*HxWx3"):
            bot.inference(question, [np.zeros((2, 3, 5), np.uint8)])
        with pytest.raises(HuatuoError, match="an image of type int: give a file path, a PIL image"):
            bot.inference(question, [5])
        with pytest.raises(HuatuoError, match=r"start a new conversation \(clear_history\(\) in Python"):
            bot.chat(question, [images[0]] * 7)


def test_closing_the_model_gives_the_network_back():
    """Issue 33: after bot.close() name resolution stayed blocked for the whole notebook. The guard holds while a
    model is open; its refusal says so. (Audit events are raised directly: nothing leaves the machine.)"""
    code = textwrap.dedent("""
        import sys
        from huatuo_local.runtime.core.offline import NetworkBlocked, forbid_network
        def lookup():
            try:
                sys.audit("socket.getaddrinfo", "huggingface.co", 443, 0, 0, 0)
                return "allowed"
            except NetworkBlocked as e:
                return "blocked: " + str(e)
        first, second = forbid_network(), forbid_network()
        print(lookup())
        first.release(); first.release()
        print(lookup())
        second.release()
        print(lookup())
    """)
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, proc.stdout + proc.stderr
    assert lines[0].startswith("blocked: name lookup of 'huggingface.co' refused") and "bot.close()" in lines[0]
    assert lines[1].startswith("blocked:") and lines[2] == "allowed"


def test_images_encoded_while_the_model_loads_give_the_same_answer(model, images):
    """Issue 38: the first question's images are encoded on a thread while the LLM loads (chat passes them):
    the encoding is used, not redone, and the greedy answer is the one without it, token for token."""
    from huatuo_local import HuatuoChatbot

    question = "Compare the two images."
    answers, hits = [], []
    for prefetch in (None, images[:2]):
        with HuatuoChatbot(str(model.manifest_path), temperature=0, max_new_tokens=24, prefix_cache=False,
                           prefetch_images=prefetch) as bot:
            answers.append((bot.inference(question, images[:2])[0], bot.last_reply.tokens))
            hits.append(bot.engine.prefetch_hits)
    assert answers[0] == answers[1] and hits == [0, 2]
    # The command line does it too: its answer is the Python API's.
    one = chat(model, *images[:2], "--max-tokens", "24", "--json", "-p", question)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["answer"] == answers[0][0]
