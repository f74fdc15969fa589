"""An answer about an image in the prefix cache costs no more CPU than one about a new image, on a busy CPU.

Issue 33: with llama.cpp's OpenMP threads spinning 300,000 iterations at every barrier (libgomp's default
when the process has no more OpenMP threads than CPUs, which is the case after a prefix-cache hit, when no
image was encoded), a CPU shared with other programs made cache hits burn 5-20x the CPU time per token of
misses. huatuo-local loads libgomp with a short spin (src/huatuo_local/native.py). Measured as work (CPU
seconds per generated token of the whole `chat` process), not wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CLI, ROOT
from PIL import Image
from tiny_models import TinySpec

# Wide enough that a token's graph has real work between its barriers, small enough to convert in seconds.
SPEC = TinySpec(hidden=256, layers=4, heads=8, kv_heads=2, ffn=768)


@pytest.fixture(scope="module")
def model(converted):
    return converted(SPEC, "Q8_0", "f16")


@pytest.fixture
def hogs():
    """One busy loop per core, ended by PID (and by themselves after two minutes if the test dies)."""
    code = "import time\nend = time.time() + 120\nwhile time.time() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def cpu_per_token(model, image, home, *extra: str) -> tuple[float, dict]:
    """CPU seconds per generated token of one `chat --json` process (user + system, all its threads)."""
    import resource

    env = dict(os.environ, HUATUO_LOCAL_HOME=str(home))
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "HUATUO_LOCAL_OPENMP_SPIN"):
        env.pop(name, None)  # the product's own setting, whatever the test runner's environment says
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([*CLI, "chat", str(image), "-p", "What does this image show?", "--json",
                           "--max-tokens", "300", "--temperature", "0", "--model", str(model.manifest_path),
                           "--threads", "2", *extra], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child was reaped: its CPU is counted here
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    generated = reply["tokens"]["generated"]
    assert generated >= 100, reply  # enough tokens that decoding, not loading, is what is measured
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu / generated, reply


def test_a_cached_image_costs_no_more_cpu_per_token_than_a_new_one_on_a_busy_cpu(model, tmp_path, hogs):
    image = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(1).random((300, 300, 3)) * 255).astype(np.uint8)).save(image)
    home = tmp_path / "home"
    _, first = cpu_per_token(model, image, home)  # encodes the image and stores its prefix
    assert first["counters"]["prefix_cache_hits"] == 0
    hits, misses = [], []
    for _ in range(2):
        cpu, reply = cpu_per_token(model, image, home)
        assert reply["counters"]["prefix_cache_hits"] == 1 and reply["counters"]["images_encoded"] == 0
        assert reply["answer"] == first["answer"]
        hits.append(cpu)
        cpu, reply = cpu_per_token(model, image, home, "--no-prefix-cache")
        assert reply["counters"]["images_encoded"] == 1
        misses.append(cpu)
    # The miss also encodes the image and reads its 576 positions, so it may cost more; the hit must not.
    # Before the fix the hits cost 3-15x the misses here.
    assert min(hits) <= 1.5 * max(misses), (hits, misses)
    assert sum(hits) <= 1.5 * sum(misses), (hits, misses)
