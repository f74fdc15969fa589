"""Ctrl-C and SIGTERM stop a convert within seconds and leave nothing; a killed one's leftovers are found.

Issue 36: the KeyboardInterrupt raised inside llama.cpp's quantizer (and the importance matrix's eval
callback) was dropped by ctypes, so the convert ran to the end and exited 0; SIGTERM into the store left
hundreds of MB of hidden files that `list` and `rm` could not see; two converts into one name collided.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import CLI, ROOT, run_cli
from tiny_models import TinySpec

# Big enough that llama.cpp's IQ2_XS quantizer takes seconds on two cores (about 8 s here).
SLOW = TinySpec(hidden=512, layers=4, heads=8, kv_heads=2, ffn=2048, seed=5)


@pytest.fixture(scope="module")
def slow(tiny, converted, tmp_path_factory):
    """The checkpoint, and a valid importance matrix for it (ones: any positive statistics will do)."""
    from huatuo_local.models.gguf_check import check_gguf
    from huatuo_local.models.imatrix import ImportanceMatrix, write_imatrix

    f32 = converted(SLOW, "F32", "f32")
    matrix = ImportanceMatrix(datasets=["ones"], chunk_count=1, chunk_size=1)
    for name, (_type, shape, _off, _n) in check_gguf(f32.llm_path, "llm").tensors.items():
        if name.startswith("blk.") and name.endswith(".weight") and len(shape) == 2:
            matrix.sums[name], matrix.counts[name] = np.ones(shape[0]), 1
    path = tmp_path_factory.mktemp("matrix") / "ones.imatrix.gguf"
    write_imatrix(path, matrix)
    return tiny(SLOW)["ckpt"], path


def start(*args: str, home) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HUATUO_LOCAL_HOME=str(home)))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def quantizing(folder) -> bool:
    """llama.cpp's quantizer has started: its output file exists under our temporary name."""
    return folder.is_dir() and any(p.name.endswith(".staging.partial") for p in folder.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_quantizer_and_leaves_nothing(slow, tmp_path, sig):
    ckpt, matrix = slow
    home = tmp_path / "home"
    store = home / "models" / "slow"
    proc = start("convert", str(ckpt), "--name", "slow", "--quant", "IQ2_XS", "--imatrix", str(matrix), home=home)
    wait_for(lambda: quantizing(store), proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    # Before the fix the convert went on to the end and exited 0, and ctypes printed the dropped interrupt.
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert err.strip().splitlines()[-1] == "interrupted" and "Exception ignored" not in err, err
    assert not store.exists() or not any(store.iterdir()), sorted(p.name for p in store.iterdir())


def test_ctrl_c_stops_the_importance_matrix_and_leaves_nothing(tiny, tmp_path):
    ckpt = tiny(TinySpec(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, seed=6))["ckpt"]
    out = tmp_path / "out"
    proc = start("convert", str(ckpt), "-o", str(out), "--quant", "IQ3_XXS", "--imatrix", "auto", home=tmp_path)
    # The lossless file is written first, then the matrix is computed from it.
    wait_for(lambda: out.is_dir() and any(p.name.endswith(".intermediate.gguf") for p in out.iterdir()), proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Exception ignored" not in err and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_a_killed_convert_leaves_files_that_doctor_finds_and_rm_removes(slow, converted, tmp_path):
    """SIGKILL cannot be caught: what it leaves is found (doctor), removed on request (rm --leftovers), and a
    second convert into a folder another one is writing into is refused in one line."""
    ckpt, matrix = slow
    home = tmp_path / "home"
    store = home / "models" / "slow"
    env = {"HUATUO_LOCAL_HOME": str(home)}
    proc = start("convert", str(ckpt), "--name", "slow", "--quant", "IQ2_XS", "--imatrix", str(matrix), home=home)
    wait_for(lambda: quantizing(store), proc)
    second = run_cli("convert", str(ckpt), "--name", "slow", "--quant", "Q4_K_M", env=env)
    assert second.returncode == 1 and second.stderr.strip() == (
        f"error: {store}: another convert or pull is writing into this folder; wait for it to finish, or choose "
        "another --name or -o"), second.stderr
    doctor = run_cli("doctor", env=env)
    assert "leftovers" not in doctor.stdout  # a running convert's files are not leftovers
    proc.kill()
    proc.communicate(timeout=30)
    left = sorted(p.name for p in store.iterdir() if p.name.startswith(".") and p.name != ".huatuo-convert.lock")
    assert left, "the kill left nothing to find (the test did not kill mid-convert)"
    doctor = run_cli("doctor", env=env)
    line = next(ln for ln in doctor.stdout.splitlines() if ln.startswith("leftovers"))
    assert f"leftovers        {len(left)} file(s)" in line and "rm --leftovers" in line, doctor.stdout
    refused = run_cli("rm", "--leftovers", env=env)  # no terminal, no --yes: nothing deleted
    assert refused.returncode == 1 and "nothing deleted" in refused.stderr
    assert sorted(p.name for p in store.iterdir() if p.name in left) == left
    done = run_cli("rm", "--leftovers", "--yes", env=env)
    assert done.returncode == 0 and f"removed {len(left)} leftover file(s)" in done.stdout, done.stderr
    assert not any(p.name in left for p in store.iterdir())
    again = run_cli("convert", str(ckpt), "--name", "slow", "--quant", "Q4_K_M", env=env)
    assert again.returncode == 0, again.stderr  # the dead convert's lock does not block the next one


def test_a_name_that_leaves_the_output_folder_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("convert", str(tiny(TinySpec())["ckpt"]), "-o", str(out), "--name", "../x", "--quant", "F16")
    assert proc.returncode == 1 and proc.stderr.strip() == ("error: --name ../x: use letters, digits, '.', '_' and "
                                                            "'-' (no folders)"), proc.stderr
    assert not any(tmp_path.glob("x-*")) and not out.exists()
