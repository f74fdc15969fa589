"""The store never deletes what is not its own, and holds several quants of one model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from tiny_models import TinySpec


def _outside(tmp_path):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_text("patient records")
    (victim / "sub" / "more.txt").write_text("more")
    return victim


def _intact(victim) -> bool:
    return (victim / "precious.txt").read_text() == "patient records" and (victim / "sub" / "more.txt").is_file()


@pytest.fixture
def store_home(tmp_path, tiny):
    home = tmp_path / "home"
    env = {"HUATUO_LOCAL_HOME": str(home)}
    ckpt = tiny(TinySpec(seed=8, tower="folder"))["ckpt"]
    for quant in ("Q8_0", "F16"):
        proc = run_cli("convert", str(ckpt), "-o", str(home / "models" / "tiny"), "--quant", quant, "--name", "tiny",
                       env=env)
        assert proc.returncode == 0, proc.stderr
    return home, env


def test_rm_refuses_paths_dotdot_and_symlinks_and_keeps_every_outside_file(store_home, tmp_path):
    home, env = store_home
    victim = _outside(tmp_path)
    models = home / "models"
    os.symlink(victim, models / "linked")  # a store entry that points out of the store
    (models / "tiny" / "escape").symlink_to(victim)
    attempts = [str(victim), "../victim", f"../../{victim.name}", "tiny/..", "tiny/../../victim", "linked",
                "victim", "tiny/escape", "./tiny", "tiny:../x", "..", ".", ""]
    for ref in attempts:
        proc = run_cli("rm", ref, "--yes", env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0, (ref, proc.stdout)
        assert len(lines) == 1 and lines[0].startswith("error: "), (ref, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert _intact(victim), ref
    # Nothing of the store went either: both quants still listed.
    listed = run_cli("list", env=env).stdout
    assert "tiny:q8_0" in listed and "tiny:f16" in listed


def test_rm_of_a_model_whose_file_is_a_symlink_removes_the_link_not_the_target(store_home, tmp_path):
    home, env = store_home
    folder = home / "models" / "tiny"
    outside = tmp_path / "outside-model.gguf"
    real = folder / "tiny-F16.gguf"
    outside.write_bytes(real.read_bytes())
    real.unlink()
    real.symlink_to(outside)
    proc = run_cli("rm", "tiny:f16", "--yes", env=env)
    assert proc.returncode == 0, proc.stderr
    assert outside.is_file() and not real.exists() and not real.is_symlink()


def test_several_quants_named_as_ollama_does(store_home, tmp_path):
    home, env = store_home
    folder = home / "models" / "tiny"
    listed = run_cli("list", env=env)
    lines = [ln for ln in listed.stdout.splitlines() if ln.startswith("tiny:")]
    assert [ln.split()[0] for ln in lines] == ["tiny:f16", "tiny:q8_0"], listed.stdout
    assert all("GiB" in ln for ln in lines)
    assert len(list(folder.glob("mmproj-*.gguf"))) == 1  # one shared projector
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(img)
    for ref in ("tiny:q8_0", "tiny:F16"):
        chat = run_cli("chat", str(img), "-p", "hi", "--model", ref, "--max-tokens", "2", "--no-prefix-cache",
                       env=env)
        assert chat.returncode == 0, (ref, chat.stderr)
    # A bare name is the best installed quant that fits this machine (Q8_0 before the lossless F16, as doctor
    # ranks them), and the answer says which (issue 33: it used to fail with "holds several models").
    bare = run_cli("chat", str(img), "-p", "hi", "--model", "tiny", "--json", "--max-tokens", "2", env=env)
    assert bare.returncode == 0, bare.stderr
    assert json.loads(bare.stdout)["model"] == "tiny:q8_0"
    missing = run_cli("chat", str(img), "-p", "hi", "--model", "tiny:q4_k_m", env=env)
    assert missing.returncode != 0 and "(installed: tiny:f16, tiny:q8_0)" in missing.stderr
    # Bare `rm` of a name with several quants asks which.
    ambiguous = run_cli("rm", "tiny", "--yes", env=env)
    assert ambiguous.returncode != 0 and "--all" in ambiguous.stderr
    removed = run_cli("rm", "tiny:f16", "--yes", env=env)
    assert removed.returncode == 0, removed.stderr
    assert "kept mmproj-tiny-f16.gguf" in removed.stdout
    assert not (folder / "tiny-F16.gguf").exists() and (folder / "mmproj-tiny-f16.gguf").is_file()
    # The bare name now means the only quant left, and it still answers.
    chat = run_cli("chat", str(img), "-p", "hi", "--model", "tiny", "--max-tokens", "2", "--no-prefix-cache", env=env)
    assert chat.returncode == 0, chat.stderr
    last = run_cli("rm", "tiny", "--yes", env=env)
    assert last.returncode == 0 and not folder.exists()


def test_rm_asks_on_a_terminal_unless_yes(store_home):
    import pexpect

    home, env = store_home
    child = pexpect.spawn(" ".join(["env", f"HUATUO_LOCAL_HOME={home}", *__import__("conftest").CLI,
                                    "rm", "tiny:q8_0"]), encoding="utf-8", timeout=60)
    child.expect(r"Delete tiny:q8_0 .*\[y/N\]")
    child.sendline("n")
    child.expect(pexpect.EOF)
    assert child.before.strip().splitlines()[-1] == "nothing deleted"  # the user's answer, not an error
    child.close()
    assert child.exitstatus != 0
    assert (home / "models" / "tiny" / "tiny-Q8_0.gguf").is_file()


def test_a_failed_convert_never_deletes_what_a_manifest_uses(tiny, tmp_path, monkeypatch):
    from huatuo_local.convert import pipeline
    from huatuo_local.models.errors import HuatuoError
    from huatuo_local.models.store import resolve

    ckpt = tiny(TinySpec(seed=8, tower="folder"))["ckpt"]
    out = tmp_path / "models"
    first = pipeline.convert(ckpt, out, quant="F16", name="tiny")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*_a, **_k):
        raise HuatuoError("simulated quantizer failure")

    monkeypatch.setattr(pipeline, "quantize_gguf", broken)
    with pytest.raises(HuatuoError, match="simulated"):
        pipeline.convert(ckpt, out, quant="Q4_K_M", name="tiny")
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # nothing deleted, nothing half-written
    assert resolve(str(first.manifest_path)).mmproj_path.is_file()


def test_same_name_other_checkpoint_does_not_overwrite_a_used_mmproj(tiny, tmp_path):
    from huatuo_local.convert.pipeline import convert
    from huatuo_local.models.store import resolve

    out = tmp_path / "models"
    a = convert(tiny(TinySpec(seed=8, tower="folder"))["ckpt"], out, quant="F16", name="tiny")
    b = convert(tiny(TinySpec(seed=9, tower="folder"))["ckpt"], out, quant="Q8_0", name="tiny")
    assert a.mmproj_path != b.mmproj_path
    assert resolve(str(a.manifest_path)).manifest.mmproj_sha256 == a.manifest.mmproj_sha256
    from huatuo_local.models.manifest import sha256_file

    assert sha256_file(a.mmproj_path) == a.manifest.mmproj_sha256


def test_manifest_naming_files_outside_its_folder_is_refused(store_home, tmp_path):
    import json

    home, env = store_home
    victim = _outside(tmp_path)
    manifest = home / "models" / "tiny" / "tiny-F16.manifest.json"
    data = json.loads(manifest.read_text())
    data["llm_file"] = str(victim / "precious.txt")
    manifest.write_text(json.dumps(data))
    for args in (("info", str(manifest)), ("rm", "tiny", "--all", "--yes")):
        run_cli(*args, env=env)
        assert _intact(victim)
    proc = run_cli("info", str(manifest), env=env)
    assert proc.returncode != 0 and "must be a file name in the manifest's folder" in proc.stderr
