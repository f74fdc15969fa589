"""The suite's own hygiene check (conftest.py) can fail: a test that leaves a process running, a socket
listening or a file in the shared temporary folder fails, and so does the run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

LEAKY = '''
import socket, subprocess, sys, tempfile

def test_leaves_a_process():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

def test_leaves_a_listening_socket():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
    test_leaves_a_listening_socket.keep = s

def test_leaves_a_file():
    tempfile.mkdtemp(prefix="leftover-")

def test_clean(tmp_path):
    (tmp_path / "mine.txt").write_text("a test's own folder")
'''


def test_a_leak_fails_its_test_and_the_run(tmp_path):
    here = Path(__file__).parent
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("conftest.py", "tiny_models.py"):
        shutil.copy(here / name, suite / name)
    (suite / "test_leaky.py").write_text(LEAKY)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
                          capture_output=True, text=True, timeout=300, cwd=suite)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    # (at the test's teardown, so pytest reports an error of that test)
    assert "ERROR test_leaky.py::test_leaves_a_process" in out and "left running" in out, out
    assert "ERROR test_leaky.py::test_leaves_a_listening_socket" in out and "left listening: ['127.0.0.1:" in out, out
    assert "LEAK: files left in the temporary folder" in out and "leftover-" in out, out
    assert "test_clean" not in out.split("short test summary")[-1], out
