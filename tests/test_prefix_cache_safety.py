"""The on-disk prefix cache never changes an answer, and what it stores is the owner's only."""

from __future__ import annotations

import json
import os
import stat
import struct

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from tiny_models import TinySpec

SPEC = TinySpec(arch="qwen2", seed=8, tower="folder")
TURNS = [("Describe the first image.", 0), ("And how does this second one differ?", 1)]


@pytest.fixture(scope="module")
def model(converted):
    return converted(SPEC, "F32", "f32")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    out = []
    for i, (w, h) in enumerate([(300, 200), (180, 260)]):
        arr = (np.random.default_rng(40 + i).random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"p{i}.png")
        out.append(str(folder / f"p{i}.png"))
    return out


def conversation(model, pictures, cache: bool, **kw):
    """A two-image conversation; returns (answers, token lists, warnings, counters)."""
    from huatuo_local import HuatuoChatbot

    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=8, prefix_cache=cache, **kw) as bot:
        replies = [bot.session.ask(text, [pictures[i]]) for text, i in TURNS]
    return ([r.text for r in replies], [r.tokens for r in replies], [r.warning for r in replies],
            [r.counters for r in replies])


@pytest.fixture(scope="module")
def reference(model, pictures, tmp_path_factory):
    home = tmp_path_factory.mktemp("refhome")
    old = os.environ["HUATUO_LOCAL_HOME"]
    os.environ["HUATUO_LOCAL_HOME"] = str(home)
    try:
        return conversation(model, pictures, cache=False)
    finally:
        os.environ["HUATUO_LOCAL_HOME"] = old


def entries(home):
    return sorted((home / "prefix-cache").glob("*.kv"), key=lambda p: p.stat().st_size)


def flip(p):
    data = bytearray(p.read_bytes())
    for k in range(len(data) - 4000, len(data) - 3000, 97):
        data[k] ^= 0x5A
    p.write_bytes(bytes(data))


def truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])


def swap(p, q):
    tmp = p.with_name("swap.tmp")
    p.rename(tmp)
    q.rename(p)
    tmp.rename(q)


def rewrite_header(p, change):
    data = p.read_bytes()
    start = len(b"HUATUO-KV\x01")
    (n,) = struct.unpack_from("<Q", data, start)
    header = json.loads(data[start + 8:start + 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    p.write_bytes(data[:start] + struct.pack("<Q", len(raw)) + raw + data[start + 8 + n:])


DAMAGE = {
    "flip_bytes": lambda es: flip(es[-1]),
    "truncate": lambda es: truncate(es[-1]),
    "truncate_both": lambda es: [truncate(e) for e in es],
    "swap_entries": lambda es: swap(es[0], es[1]),
    "other_engine_build": lambda es: rewrite_header(es[-1], lambda h: h["identity"].update(engine="0" * 64)),
    "other_mmproj": lambda es: rewrite_header(es[-1], lambda h: h["identity"].update(mmproj_sha256="1" * 64)),
    "wrong_widths": lambda es: rewrite_header(es[-1], lambda h: h.update(
        image_widths=[w - 1 for w in h["image_widths"]], positions=h["positions"] - len(h["image_widths"]))),
    "header_garbage": lambda es: es[-1].write_bytes(b"HUATUO-KV\x01" + b"\xff" * 64),
    "old_format": lambda es: es[-1].write_bytes(b"GGSQ" + b"\0" * 256),
    "empty": lambda es: es[-1].write_bytes(b""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_entries_are_dropped_and_the_answer_is_the_no_cache_answer(damage, model, pictures, reference,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(tmp_path))
    warm = conversation(model, pictures, cache=True)
    assert warm[:2] == reference[:2]
    found = entries(tmp_path)
    assert len(found) == 2  # the prefix up to image 1, and up to image 2
    DAMAGE[damage](found)
    answers, tokens, warnings, counters = conversation(model, pictures, cache=True)
    assert (answers, tokens) == reference[:2], damage
    notes = "\n".join(w for w in warnings if w)
    assert "prefix cache entry" in notes and "unusable" in notes, notes
    damaged = 2 if damage in ("swap_entries", "truncate_both") else 1
    assert notes.count("warning:") == damaged  # one warning per damaged entry, then it is gone
    again = conversation(model, pictures, cache=True)
    assert again[:2] == reference[:2] and not any(again[2])


def test_a_valid_entry_is_used_and_gives_the_same_answer(model, pictures, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(tmp_path))
    conversation(model, pictures, cache=True)
    answers, tokens, warnings, counters = conversation(model, pictures, cache=True)
    assert (answers, tokens) == reference[:2]
    assert counters[0].prefix_cache_hits == 1 and counters[0].images_encoded == 0
    assert not any(warnings)


def test_another_build_or_context_size_is_a_miss_not_a_wrong_answer(model, pictures, reference, tmp_path,
                                                                     monkeypatch):
    from huatuo_local.runtime.core import loading

    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(tmp_path))
    conversation(model, pictures, cache=True)
    monkeypatch.setattr(loading, "engine_build_id", lambda: "f" * 64)
    answers, tokens, _, counters = conversation(model, pictures, cache=True)
    assert (answers, tokens) == reference[:2] and counters[0].prefix_cache_hits == 0
    monkeypatch.undo()
    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(tmp_path))
    answers, tokens, _, counters = conversation(model, pictures, cache=True, n_ctx=2048)
    assert (answers, tokens) == reference[:2] and counters[0].prefix_cache_hits == 0


def test_a_cache_hit_does_not_skip_the_vision_probe(model, pictures, tmp_path, monkeypatch):
    from huatuo_local.models.errors import HuatuoError
    from huatuo_local.runtime.engine import probe

    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(tmp_path))
    conversation(model, pictures, cache=True)
    failing = probe.ProbeResult(ok=False, verdict="class-token-last", library="libmtmd.so", max_abs_diff=1.0,
                                scale=1.0, detail="simulated")
    monkeypatch.setattr(probe, "check_library", lambda use_cache=True: failing)
    with pytest.raises(HuatuoError, match="encodes LLaVA images wrongly"):
        conversation(model, pictures, cache=True)


def test_cache_files_are_owner_only_without_touching_the_umask(model, pictures, tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(tmp_path))
    folder = tmp_path / "prefix-cache"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)  # an existing, too open folder is tightened

    def no_umask(*_a):
        raise AssertionError("os.umask changes permissions for every thread of the process")

    monkeypatch.setattr(os, "umask", no_umask)
    conversation(model, pictures, cache=True)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    found = entries(tmp_path)
    assert found and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in found)


def test_cache_info_and_clear(model, pictures, tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(tmp_path))
    conversation(model, pictures, cache=True)
    stray = tmp_path / "prefix-cache" / "notes.txt"
    stray.write_text("not the cache's")
    env = {"HUATUO_LOCAL_HOME": str(tmp_path)}
    info = run_cli("cache", "info", env=env)
    assert info.returncode == 0 and "entries  2" in info.stdout and "MiB" in info.stdout, info.stdout
    cleared = run_cli("cache", "clear", env=env)
    assert cleared.returncode == 0 and cleared.stdout.startswith("removed 2 entries")
    assert not entries(tmp_path) and stray.is_file()  # only its own files
    assert "entries  0" in run_cli("cache", "info", env=env).stdout


def test_saved_transcript_is_owner_only(model, pictures, tmp_path):
    from huatuo_local.runtime.cli.repl import _save

    from huatuo_local import HuatuoChatbot

    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=3, prefix_cache=False) as bot:
        bot.chat("Describe.", [pictures[0]])
        for name in ("t.md", "t.json"):
            target = tmp_path / name
            _save(bot, str(target))
            assert stat.S_IMODE(target.stat().st_mode) == 0o600 and "Describe." in target.read_text()


def test_the_cache_keeps_to_its_budget_and_can_be_turned_off(model, tmp_path, monkeypatch):
    """HUATUO_LOCAL_PREFIX_CACHE_MB bounds the folder (the oldest entries go first) and
    HUATUO_LOCAL_PREFIX_CACHE=0 stores nothing (issue 22: never tested)."""
    from huatuo_local import HuatuoChatbot

    paths = []
    for i in range(12):
        p = tmp_path / f"s{i}.png"
        Image.fromarray((np.random.default_rng(500 + i).random((60, 80, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "prefix-cache"
    monkeypatch.setenv("HUATUO_LOCAL_PREFIX_CACHE_MB", "1")
    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=2) as bot:
        bot.inference("What is it?", [paths[0]])
        first = sorted(folder.glob("*.kv"))
        assert len(first) == 1
        size = first[0].stat().st_size
        fit = (1024 * 1024) // size
        assert 1 <= fit < 10, size  # a 1 MiB budget holds a few entries of this model
        for p in paths[1:fit + 3]:
            bot.inference("What is it?", [p])
    kept = list(folder.glob("*.kv"))
    assert len(kept) == fit and sum(p.stat().st_size for p in kept) <= 1024 * 1024
    assert not first[0].exists(), "the oldest entry is evicted first"
    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=2) as bot:  # the newest is still used
        bot.inference("What is it?", [paths[fit + 2]])
        assert bot.counters.prefix_cache_hits == 1 and bot.counters.images_encoded == 0
    monkeypatch.setenv("HUATUO_LOCAL_PREFIX_CACHE", "0")
    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(tmp_path / "off"))
    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=2) as bot:
        bot.inference("What is it?", [paths[0]])
    assert not (tmp_path / "off" / "prefix-cache").exists() or not list((tmp_path / "off" / "prefix-cache").iterdir())
