"""The model store commands, pull without network, and the no-download selftest."""

from __future__ import annotations

import json

import numpy as np
from conftest import run_cli
from PIL import Image
from tiny_models import TinySpec


def test_store_list_info_chat_by_name_and_rm(tiny, tmp_path):
    home = tmp_path / "home"
    env = {"HUATUO_LOCAL_HOME": str(home)}
    empty = run_cli("list", env=env)
    assert empty.returncode == 0 and "huatuo-local pull huatuo-vision-7b" in empty.stdout
    ckpt = tiny(TinySpec(seed=8, tower="folder"))["ckpt"]
    conv = run_cli("convert", str(ckpt), "-o", str(home / "models" / "mytiny"), "--quant", "Q8_0", "--name",
                   "mytiny", env=env)
    assert conv.returncode == 0, conv.stderr
    listed = run_cli("list", env=env)
    assert "mytiny" in listed.stdout and "Q8_0" in listed.stdout
    info = run_cli("info", "mytiny", env=env)
    assert info.stdout.startswith("model            mytiny:q8_0\nquant            Q8_0\n"), info.stdout
    assert "mmproj-mytiny-f16.gguf (f16," in info.stdout and "{" not in info.stdout
    as_json = json.loads(run_cli("info", "mytiny", "--json", env=env).stdout)
    assert as_json["quant"] == "Q8_0" and as_json["mmproj_file"] == "mmproj-mytiny-f16.gguf"
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((50, 80, 3)) * 255).astype(np.uint8)).save(img)
    chat = run_cli("chat", str(img), "-p", "hi", "--model", "mytiny", "--max-tokens", "3", env=env)
    assert chat.returncode == 0, chat.stderr
    for stdin in (None, "n\n", "y\n"):  # no terminal: nothing is deleted without --yes, whatever is piped in
        refused = run_cli("rm", "mytiny", input=stdin, env=env)
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.strip() == ("error: rm mytiny: would delete mytiny:q8_0 (0.00 GiB); nothing deleted: "
                                          "confirm in a terminal, or add --yes")
        assert (home / "models" / "mytiny" / "mytiny-Q8_0.gguf").is_file()
    removed = run_cli("rm", "mytiny", "--yes", env=env)
    assert removed.returncode == 0 and not (home / "models" / "mytiny").exists()
    again = run_cli("rm", "mytiny", env=env)
    assert again.returncode != 0 and again.stderr.strip().startswith("error: model mytiny is not installed")


def test_pull_without_network_says_what_to_do(tmp_path):
    env = {"HUATUO_LOCAL_HOME": str(tmp_path / "home"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    proc = run_cli("pull", "huatuo-vision-7b", env=env, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert last.startswith("error: FreedomIntelligence/HuatuoGPT-Vision-7B: cannot reach Hugging Face")
    assert "huatuo-local pull FOLDER --name NAME" in last
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())
    bad = run_cli("pull", "not a repo", env=env)
    assert bad.returncode != 0 and "not a known model" in bad.stderr


def test_doctor_selftest_converts_and_chats_without_download(tmp_path):
    proc = run_cli("doctor", "--selftest", env={"HUATUO_LOCAL_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("selftest         ok on ") and "meaningless" in first
    assert "generated 16 tokens" in first
    # Where huatuo-local keeps things, and how much (issue 33).
    store = next(line for line in proc.stdout.splitlines() if line.startswith("store "))
    assert f"store            {tmp_path}: 0 model(s), 0.00 GiB;" in store and "GiB free on its disk" in store


def test_every_command_has_help_with_an_example():
    for cmd in ("convert", "chat", "doctor", "pull", "list", "info", "rm"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0, cmd
        assert "Example" in proc.stdout and "huatuo-local " + cmd in proc.stdout.replace("\n", " "), cmd


def test_a_checkpoint_on_an_offline_machine_goes_into_the_store(tiny, tmp_path):
    """Issue 22: one documented command puts a local checkpoint in the store; suggestions come from what is
    installed; a bad quant is refused before any network access."""
    home = tmp_path / "home"
    env = {"HUATUO_LOCAL_HOME": str(home), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    ckpt = tiny(TinySpec(seed=8, tower="folder"))["ckpt"]
    conv = run_cli("convert", str(ckpt), "--name", "mytiny", "--quant", "Q8_0", env=env)
    assert conv.returncode == 0, conv.stderr
    assert "in the local store as mytiny:q8_0" in conv.stdout
    pulled = run_cli("pull", str(ckpt), "--name", "other", "--quant", "F16", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith("ready: other:f16 (other-F16.gguf); try: huatuo-local chat IMAGE --model other")
    listed = run_cli("list", env=env).stdout
    assert "mytiny:q8_0" in listed and "other:f16" in listed
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((50, 80, 3)) * 255).astype(np.uint8)).save(img)
    for ref, needle in [
        ("mytiny:q5_k_m", "error: mytiny:q5_k_m is not installed (installed: mytiny:q8_0); convert the checkpoint "
                          "again with --quant"),
        ("mytiyn", "error: model mytiyn is not installed; did you mean mytiny?"),
        ("zzz", "error: model zzz is not installed (installed: mytiny, other)"),
    ]:
        proc = run_cli("chat", str(img), "-p", "hi", "--model", ref, env=env)
        assert proc.returncode == 1 and proc.stderr.strip().startswith(needle), proc.stderr
        assert "pull" not in proc.stderr.split("installed")[0]
    ok = run_cli("chat", str(img), "-p", "hi", "--model", "mytiny", "--max-tokens", "2", env=env)
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("pull", "huatuo-vision-7b", "--quant", "Q9_X", env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --quant Q9_X: unknown type"), bad.stderr
