from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import astuple
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import TinySpec, make_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Every test (and every CLI it starts) gets a private store, probe cache and prefix cache.
_HOME = Path(tempfile.mkdtemp(prefix="huatuo-test-home-"))
os.environ["HUATUO_LOCAL_HOME"] = str(_HOME)
CLI = [sys.executable, "-m", "huatuo_local"]


def pytest_sessionfinish(session, exitstatus):
    """The private home goes with the run (stores, prefix caches and probes of every test)."""
    import shutil

    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(TinySpec(...)) → checkpoint info, built once per spec per session."""
    cache: dict = {}

    def build(spec: TinySpec | None = None) -> dict:
        spec = spec or TinySpec()
        key = repr(astuple(spec))
        if key not in cache:
            cache[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt"), spec)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def converted(tiny, tmp_path_factory):
    """converted(spec, quant, mmproj_type) → ConvertResult, once per combination."""
    from huatuo_local.convert.pipeline import convert

    cache: dict = {}

    def build(spec: TinySpec | None = None, quant: str = "F32", mmproj_type: str = "f32", **kw):
        spec = spec or TinySpec()
        key = (repr(astuple(spec)), quant, mmproj_type, tuple(sorted(kw.items())))
        if key not in cache:
            info = tiny(spec)
            out = tmp_path_factory.mktemp("gguf")
            cache[key] = convert(info["ckpt"], out, quant=quant, mmproj_type=mmproj_type, name="tiny", **kw)
        return cache[key]

    return build


def run_cli(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 300):
    """Run `huatuo-local ARGS` as a user would, in a subprocess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=input, env=full_env,
                          timeout=timeout, cwd=ROOT)
