"""`huatuo-local pull` against a Hub-compatible server on 127.0.0.1: the routes huggingface_hub uses."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI, ROOT, run_cli
from fake_hub import FakeHub, Repo
from PIL import Image
from tiny_models import TinySpec

REPO = "FreedomIntelligence/HuatuoGPT-Vision-7B"  # what `pull huatuo-vision-7b` asks for
BIG = TinySpec(seed=21, tower="folder", ffn=16384)  # ~25 MB of F32 weights: above hf's 10 MB chunk


def _env(tmp_path, hub) -> dict:
    return {"HUATUO_LOCAL_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "10"}


def _repo_folder(tiny, tmp_path, spec: TinySpec) -> tuple:
    src = tiny(spec)["ckpt"]
    folder = tmp_path / "repo"
    shutil.copytree(src, folder)
    # Files a conversion does not need: never fetched.
    (folder / "README.md").write_text("# model card\n")
    (folder / "training_args.bin").write_bytes(b"\0" * 4096)
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 4096)  # safetensors are preferred
    return folder


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(3).random((60, 80, 3)) * 255).astype(np.uint8)).save(p)
    return p


def test_pull_downloads_only_what_it_needs_converts_and_chats(tiny, tmp_path, image):
    folder = _repo_folder(tiny, tmp_path, TinySpec(seed=8, tower="folder"))
    with FakeHub({REPO: Repo(folder)}) as hub:
        env = _env(tmp_path, hub)
        proc = run_cli("pull", "huatuo-vision-7b", "--quant", "Q8_0", env=env)
        assert proc.returncode == 0, proc.stderr
        assert "download" in proc.stderr  # progress
        sha = hub.repos[REPO].sha
        got = {p.split(f"/resolve/{sha}/", 1)[1] for p in hub.fetched("GET") if f"/resolve/{sha}/" in p}
        expected = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {
            "README.md", "training_args.bin", "pytorch_model.bin"}
        assert got == expected, got ^ expected
        assert any(g.startswith("vit/tiny_clip/") for g in got)  # the tower's sub-folder was found
    assert "ready: huatuo-vision-7b:q8_0" in proc.stdout and sha[:12] in proc.stdout
    manifest = json.loads((tmp_path / "home" / "models" / "huatuo-vision-7b" / "huatuo-vision-7b-Q8_0.manifest.json")
                          .read_text())
    assert manifest["revision"] == sha and manifest["source"] == REPO and manifest["quant"] == "Q8_0"
    chat = run_cli("chat", str(image), "-p", "hi", "--model", "huatuo-vision-7b:q8_0", "--max-tokens", "3",
                   env={"HUATUO_LOCAL_HOME": str(tmp_path / "home")})
    assert chat.returncode == 0, chat.stderr


def test_another_quant_needs_no_download_and_an_installed_one_is_said(tiny, tmp_path, image):
    """Issue 33: every pull downloaded the whole checkpoint again, even for a second quant of a model that was
    there. The lossless conversion is kept (a store model of its own), the next quant is made from it with no
    request at all, an installed quant is said to be installed, and a bare name means the best that fits."""
    from huatuo_local.convert.pipeline import convert

    spec = TinySpec(seed=8, tower="folder")
    folder = _repo_folder(tiny, tmp_path, spec)
    home = tmp_path / "home"
    store = home / "models" / "huatuo-vision-7b"
    with FakeHub({REPO: Repo(folder)}) as hub:
        env = _env(tmp_path, hub)
        first = run_cli("pull", "huatuo-vision-7b", "--quant", "Q8_0", env=env)
        assert first.returncode == 0, first.stderr
        assert "kept huatuo-vision-7b:f32 (" in first.stdout and "rm huatuo-vision-7b:f32" in first.stdout
        hub.requests.clear()
        again = run_cli("pull", "huatuo-vision-7b", "--quant", "q8_0", env=env)
        assert again.returncode == 0, again.stderr
        assert again.stdout.startswith("huatuo-vision-7b:q8_0 is already installed (")
        second = run_cli("pull", "huatuo-vision-7b", "--quant", "Q4_K_M", env=env)
        assert second.returncode == 0, second.stderr
        assert "made from huatuo-vision-7b:f32, without downloading" in second.stdout
        assert hub.requests == []  # not even a listing
    # The quant made from the kept conversion is the bytes a conversion of the checkpoint gives.
    direct = convert(tiny(spec)["ckpt"], tmp_path / "direct", quant="Q4_K_M", name="huatuo-vision-7b")
    made = json.loads((store / "huatuo-vision-7b-Q4_K_M.manifest.json").read_text())
    assert made["llm_sha256"] == direct.manifest.llm_sha256
    assert made["revision"] == hub.repos[REPO].sha and made["source"] == REPO
    # Nothing is left in the download folder, not even the repository's empty folder.
    assert not (home / "downloads").exists() or not any((home / "downloads").iterdir())
    listed = json.loads(run_cli("list", "--json", env={"HUATUO_LOCAL_HOME": str(home)}).stdout)
    assert sorted(r["ref"] for r in listed) == ["huatuo-vision-7b:f32", "huatuo-vision-7b:q4_k_m",
                                                "huatuo-vision-7b:q8_0"]
    # A bare name is the best installed quant that fits (Q8_0 before Q4_K_M; lossless types last), and every
    # answer says which one.
    chat = run_cli("chat", str(image), "-p", "hi", "--model", "huatuo-vision-7b", "--max-tokens", "3", "--json",
                   env={"HUATUO_LOCAL_HOME": str(home)})
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout)["model"] == "huatuo-vision-7b:q8_0"
    gone = run_cli("rm", "huatuo-vision-7b:f32", "--yes", env={"HUATUO_LOCAL_HOME": str(home)})
    assert gone.returncode == 0 and "removed huatuo-vision-7b:f32" in gone.stdout, gone.stderr
    assert not (store / "huatuo-vision-7b-F32.gguf").exists() and (store / "huatuo-vision-7b-Q8_0.gguf").is_file()


def test_a_kept_checkpoint_makes_other_quants_offline_and_rm_removes_it(tiny, tmp_path):
    folder = _repo_folder(tiny, tmp_path, TinySpec(seed=8, tower="folder"))
    home = tmp_path / "home"
    with FakeHub({REPO: Repo(folder)}) as hub:
        env = _env(tmp_path, hub)
        first = run_cli("pull", "huatuo-vision-7b", "--quant", "Q8_0", "--keep", "checkpoint", env=env)
        assert first.returncode == 0, first.stderr
        assert "kept huatuo-vision-7b:checkpoint (" in first.stdout
        hub.requests.clear()
        second = run_cli("pull", "huatuo-vision-7b", "--quant", "F16", "--keep", "none", env=env)
        assert second.returncode == 0, second.stderr
        assert "made from huatuo-vision-7b:checkpoint, without downloading" in second.stdout
        assert hub.requests == []
        bad = run_cli("pull", "huatuo-vision-7b", "--keep", "everything", env=env)
        assert bad.returncode == 1 and bad.stderr.strip() == ("error: --keep everything: choose lossless, "
                                                              "checkpoint, none")
    local = {"HUATUO_LOCAL_HOME": str(home)}
    listed = {r["ref"]: r for r in json.loads(run_cli("list", "--json", env=local).stdout)}
    assert set(listed) == {"huatuo-vision-7b:q8_0", "huatuo-vision-7b:f16", "huatuo-vision-7b:checkpoint"}
    snapshot = Path(listed["huatuo-vision-7b:checkpoint"]["files"][0])
    assert snapshot.is_dir() and (snapshot / "config.json").is_file()
    several = run_cli("rm", "huatuo-vision-7b", "--yes", env=local)
    assert several.returncode == 1 and "huatuo-vision-7b:checkpoint" in several.stderr
    gone = run_cli("rm", "huatuo-vision-7b", "--all", "--yes", env=local)
    assert gone.returncode == 0, gone.stderr
    assert "huatuo-vision-7b:checkpoint" in gone.stdout
    assert not snapshot.exists() and not (home / "models" / "huatuo-vision-7b").exists()
    assert not any((home / "downloads").iterdir())


def test_an_interrupted_pull_resumes_without_fetching_bytes_twice(tiny, tmp_path):
    folder = _repo_folder(tiny, tmp_path, BIG)
    weights = "model.safetensors"
    size = (folder / weights).stat().st_size
    assert size > 20 * 1024 * 1024
    with FakeHub({REPO: Repo(folder)}) as hub:
        env = dict(os.environ, **_env(tmp_path, hub))
        hub.stall_after[weights] = 12 * 1024 * 1024
        first = subprocess.Popen([*CLI, "pull", "huatuo-vision-7b", "--quant", "F16"], env=env, cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while hub.sent[weights] < 12 * 1024 * 1024 and time.time() < deadline:
            time.sleep(0.1)
        # The client has written its first 10 MB chunk to disk (seen there, not guessed from a pause).
        partial = tmp_path / "home" / "downloads" / REPO.replace("/", "--") / hub.repos[REPO].sha / f"{weights}.partial"
        while not (partial.is_file() and partial.stat().st_size >= 10 * 1024 * 1024) and time.time() < deadline:
            time.sleep(0.05)
        assert partial.stat().st_size >= 10 * 1024 * 1024
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        hub.release.set()
        sent_before = hub.sent[weights]
        del hub.stall_after[weights]
        second = run_cli("pull", "huatuo-vision-7b", "--quant", "F16", env=_env(tmp_path, hub))
        assert second.returncode == 0, second.stderr
        ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith(weights) and r]
        assert ranges, "the second run did not resume with a Range request"
        start = int(ranges[-1].split("=")[1].split("-")[0])
        assert start >= 10 * 1024 * 1024
        resumed = hub.sent[weights] - sent_before
        assert resumed == size - start  # the bytes already on disk were not fetched again
    assert (tmp_path / "home" / "models" / "huatuo-vision-7b" / "huatuo-vision-7b-F16.gguf").is_file()


def test_pull_checks_disk_space_before_downloading(tiny, tmp_path):
    folder = _repo_folder(tiny, tmp_path, TinySpec(seed=8, tower="folder"))
    with FakeHub({REPO: Repo(folder, claimed_sizes={"model.safetensors": 10**15})}) as hub:
        proc = run_cli("pull", "huatuo-vision-7b", "--quant", "Q4_K_M", env=_env(tmp_path, hub))
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert "needs about" in last and "GB free" in last and "2.5x" in last, last
        assert not any(p.endswith("model.safetensors") for p in hub.fetched("GET"))


def test_pull_of_a_gguf_repo_copies_exactly_the_quant_asked_for(converted, tmp_path, image):
    folder = tmp_path / "gguf-repo"
    folder.mkdir()
    for quant in ("Q8_0", "F16"):
        result = converted(TinySpec(seed=8, tower="folder"), quant, "f16")
        shutil.copy(result.llm_path, folder / f"tiny-{quant}.gguf")
        shutil.copy(result.mmproj_path, folder / "mmproj-tiny-f16.gguf")
    (folder / "tiny-Q8_0-extra.gguf").write_bytes((folder / "tiny-Q8_0.gguf").read_bytes())  # not exactly Q8_0
    with FakeHub({"someone/tiny-GGUF": Repo(folder)}) as hub:
        env = _env(tmp_path, hub)
        proc = run_cli("pull", "someone/tiny-GGUF", "--quant", "q8_0", "--name", "tiny", env=env)
        assert proc.returncode == 0, proc.stderr
        fetched = {p.rsplit("/", 1)[1] for p in hub.fetched("GET") if "/resolve/" in p}
        assert fetched == {"tiny-Q8_0.gguf", "mmproj-tiny-f16.gguf"}, fetched
        missing = run_cli("pull", "someone/tiny-GGUF", "--quant", "Q4_K_M", "--name", "tiny", env=env)
        assert missing.returncode != 0 and "no Q4_K_M GGUF" in missing.stderr
        badrev = run_cli("pull", "someone/tiny-GGUF", "--revision", "nope", "--name", "tiny", env=env)
        assert badrev.returncode != 0 and "no such revision" in badrev.stderr
        nothere = run_cli("pull", "someone/absent", env=env)
        assert nothere.returncode != 0 and "no such Hugging Face repository" in nothere.stderr
    stored = tmp_path / "home" / "models" / "tiny"
    for f in ("tiny-Q8_0.gguf", "mmproj-tiny-f16.gguf"):
        p = stored / f
        assert p.is_file() and not p.is_symlink() and p.stat().st_nlink == 1
    manifest = json.loads((stored / "tiny-Q8_0.manifest.json").read_text())
    assert manifest["revision"] == hub.repos["someone/tiny-GGUF"].sha
    # The checksums are of the bytes in the store (the model's is computed while copying it there).
    for key, f in (("llm_sha256", "tiny-Q8_0.gguf"), ("mmproj_sha256", "mmproj-tiny-f16.gguf")):
        assert manifest[key] == hashlib.sha256((stored / f).read_bytes()).hexdigest(), key
        assert manifest[key] == hashlib.sha256((folder / f).read_bytes()).hexdigest(), key
    # The download folder is gone once copied: the store depends on nothing else.
    assert not list((tmp_path / "home" / "downloads").rglob("*.gguf"))
    chat = run_cli("chat", str(image), "-p", "hi", "--model", "tiny:q8_0", "--max-tokens", "3",
                   env={"HUATUO_LOCAL_HOME": str(tmp_path / "home")})
    assert chat.returncode == 0, chat.stderr


@pytest.mark.parametrize("sha", ["../../../victim", "/ABSOLUTE", "main", "0" * 39 + "/", "A" * 40])
def test_a_hostile_hub_sha_never_becomes_a_path(tiny, tmp_path, sha):
    """Issue 21: the commit id a Hub (or an HF_ENDPOINT mirror) returns was used as a folder, then deleted."""
    for kind in ("checkpoint", "gguf"):
        home = tmp_path / kind / "a" / "home"
        victim = tmp_path / kind / "a" / "victim"  # where home/downloads/REPO/../../../victim lands
        victim.mkdir(parents=True)
        (victim / "keep.txt").write_text("precious")
        folder = _repo_folder(tiny, tmp_path / kind, TinySpec(seed=8, tower="folder"))
        if kind == "gguf":
            for f in list(folder.iterdir()):
                (shutil.rmtree if f.is_dir() else os.unlink)(f)
            (folder / "tiny-Q4_K_M.gguf").write_bytes(b"GGUF")
            (folder / "mmproj-tiny-f16.gguf").write_bytes(b"GGUF")
        repo = Repo(folder)
        wanted = sha.replace("/ABSOLUTE", str(victim))
        repo.sha = wanted
        with FakeHub({REPO: repo}) as hub:
            env = dict(_env(tmp_path, hub), HUATUO_LOCAL_HOME=str(home))
            proc = run_cli("pull", "huatuo-vision-7b", "--quant", "Q4_K_M", env=env)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: {REPO}: the Hub answered {wanted[:60]!r} where a commit id (40 hex digits) belongs; "
            "check HF_ENDPOINT"]
        assert (victim / "keep.txt").read_text() == "precious"
        assert not any(p.name != "keep.txt" for p in victim.rglob("*")), "nothing was written outside the store"
        assert not any(hub.fetched("GET")) or all("/resolve/" not in p for p in hub.fetched("GET"))


def test_a_revision_that_no_ref_can_be_is_refused_before_any_request(tmp_path):
    with FakeHub({}) as hub:
        for bad in ("../../etc", "/abs", "a/../b", "x\ny", "-flag"):
            proc = run_cli("pull", "huatuo-vision-7b", "--quant", "Q4_K_M", "--revision", bad, env=_env(tmp_path, hub))
            assert proc.returncode == 1 and "give a branch, tag or commit id" in proc.stderr, bad
            assert len(proc.stderr.strip().splitlines()) == 1
        assert hub.requests == []


def test_pull_without_a_quant_chooses_the_best_that_fits(tiny, tmp_path, image):
    """Issue 24: `pull NAME` picks the best quant whose weights, KV cache and buffers fit the free memory
    (`--memory` stands in for another machine's), says so with what else fits, and computes the importance
    matrix a low-bit quant needs; when nothing fits it refuses before any request."""
    from huatuo_local.models.registry import GIB, KNOWN_MODELS
    from huatuo_local.models.sizing import best_quant

    expected = best_quant(KNOWN_MODELS["huatuo-vision-7b"], int(6.5 * GIB))  # IQ4_XS: computes a matrix
    folder = _repo_folder(tiny, tmp_path, TinySpec(seed=8, tower="folder"))
    with FakeHub({REPO: Repo(folder)}) as hub:
        env = _env(tmp_path, hub)
        refused = run_cli("pull", "huatuo-vision-34b", "--memory", "8", env=env)
        assert refused.returncode == 1 and not hub.requests, refused.stderr
        assert refused.stderr.startswith("error: huatuo-vision-34b: nothing fits in 8.0 GiB free RAM (the smallest, "
                                         "IQ2_XS, needs "), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        proc = run_cli("pull", "huatuo-vision-7b", "--memory", "6.5", env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
    assert f"choosing {expected.quant}: needs {expected.need().total / GIB:.1f} GiB of 6.5 GiB free RAM" in proc.stderr
    assert f"also fits: {', '.join(expected.fits[1:4])}" in proc.stderr
    manifest = json.loads((tmp_path / "home" / "models" / "huatuo-vision-7b" /
                           f"huatuo-vision-7b-{expected.quant}.manifest.json").read_text())
    assert manifest["quant"] == expected.quant == "IQ4_XS"
    assert manifest["extra"]["imatrix"]["datasets"] == ["huatuo-local bundled calibration (14 image+text)"]
    chat = run_cli("chat", str(image), "-p", "hi", "--model", "huatuo-vision-7b", "--max-tokens", "3",
                   env={"HUATUO_LOCAL_HOME": str(tmp_path / "home")})
    assert chat.returncode == 0, chat.stderr
