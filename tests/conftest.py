from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import TinySpec, make_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Every test run has a temporary folder of its own: TMPDIR for this process and every process it starts
# (pytest's tmp_path folders are made inside it too), so that whatever a test, the product or a library
# writes to "the temporary folder" is found, and checked, at the end of the run (see pytest_sessionfinish).
_RUN_TMP = Path(tempfile.mkdtemp(prefix="ht-"))  # short: Ray's socket paths below it must fit in 107 bytes
os.environ["TMPDIR"] = str(_RUN_TMP)
tempfile.tempdir = str(_RUN_TMP)
# Every test (and every CLI it starts) gets a private store, probe cache and prefix cache.
_HOME = _RUN_TMP / "home"
_HOME.mkdir()
os.environ["HUATUO_LOCAL_HOME"] = str(_HOME)
CLI = [sys.executable, "-m", "huatuo_local"]
# HUATUO_LOCAL_TEST_GPU=1 (scripts/gpu_check.py's test phase): the tests' own engines go on the GPU too. Commands
# the tests run put the model on the GPU anyway (the default placement) unless a test keeps it on the CPU.
ON_GPU = os.environ.get("HUATUO_LOCAL_TEST_GPU") == "1"
# Importing transformers' model classes (the PyTorch reference) makes torch's compile cache folder, empty, in
# the temporary folder: the run names it rather than find it as a leak.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_RUN_TMP / "torch-cache")
# What the run itself keeps in its temporary folder; anything else left there at the end was leaked.
_OWN = {"home", "torch-cache", f"pytest-of-{__import__('getpass').getuser()}"}


def _children() -> dict[int, str]:
    """This process's living descendants, and their command lines."""
    import psutil

    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                out[child.pid] = " ".join(child.cmdline())[:160]
        except psutil.Error:
            continue
    return out


def _under(pid: int, older: set[int]) -> bool:
    """Whether one of `pid`'s ancestors (below this process) is in `older`."""
    import psutil

    try:
        for parent in psutil.Process(pid).parents():
            if parent.pid == os.getpid():
                return False
            if parent.pid in older:
                return True
    except psutil.Error:
        return False
    return False


def engine_options(**given):
    """EngineOptions for a test's in-process engine: every layer on the GPU under HUATUO_LOCAL_TEST_GPU=1, else as
    given (the CPU by default)."""
    from huatuo_local.runtime.engine.engine import EngineOptions

    if ON_GPU:
        given.setdefault("n_gpu_layers", -1)
    return EngineOptions(**given)


def pytest_configure(config):
    if ON_GPU:  # a GPU run that found no GPU must not pass as one
        from huatuo_local.runtime.llama.devices import local_gpus

        if not local_gpus():
            pytest.exit("HUATUO_LOCAL_TEST_GPU=1 but llama.cpp finds no GPU (see huatuo-local doctor)", returncode=3)


def _strays() -> dict[int, str]:
    """Processes outside this one's tree started for this run (a daemon, Ray's node agents): their command
    line or their environment names this run's folder."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["pid"] == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            line = " ".join(proc.info["cmdline"] or [])
            env = proc.environ()
        except psutil.Error:
            continue
        if str(_RUN_TMP) in line or any(str(_RUN_TMP) in v for v in env.values()):
            out[proc.info["pid"]] = line[:160]
    return out


def _listening() -> list[str]:
    """This process's listening sockets, less the relays of RPC workers it registered: those last as long as
    the process (runtime/rpc/client.py registered_relays)."""
    import psutil

    lasting: set[str] = set()
    if "huatuo_local.runtime.rpc.client" in sys.modules:
        lasting = set(sys.modules["huatuo_local.runtime.rpc.client"].registered_relays())
    try:
        return [f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and f"{c.laddr.ip}:{c.laddr.port}" not in lasting]
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def _ends_what_it_starts(request):
    """Every process a test starts is ended (by PID) by the end of that test, and no socket of this
    process is left listening: else the test fails, naming them, and they are ended here."""
    import psutil

    before, ports = set(_children()), set(_listening())
    yield
    # A process started by one that was already running (a module's server: Ray Serve replacing a replica it
    # lost) is that process's, ended with it; the test's own are those whose line of parents reaches this
    # process without passing through an older one.
    leaked = {pid: line for pid, line in _children().items() if pid not in before and not _under(pid, before)}
    deadline = time.time() + 5  # a process being stopped may need a moment to exit
    while leaked and time.time() < deadline:
        time.sleep(0.1)
        leaked = {pid: line for pid, line in _children().items() if pid in leaked}
    for pid in leaked:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    listening = sorted(set(_listening()) - ports)
    assert not leaked and not listening, (f"{request.node.nodeid} left running: {leaked}; left listening: "
                                          f"{listening}")


def pytest_sessionfinish(session, exitstatus):
    """The run's folder goes with it; a process, or a file outside the tests' own folders, left behind fails
    the run (a test that leaks them makes the machine, and the next run, worse)."""
    import shutil

    problems = []
    strays = {**_children(), **_strays()}
    if strays:
        problems.append(f"processes left running: {strays}")
        import psutil

        for pid in strays:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
    left = sorted(p.name for p in _RUN_TMP.iterdir() if p.name not in _OWN)
    if left:
        problems.append(f"files left in the temporary folder (not a test's tmp_path): {left}")
    shutil.rmtree(_RUN_TMP, ignore_errors=True)
    if problems:
        print("\n" + "\n".join(f"LEAK: {p}" for p in problems), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
