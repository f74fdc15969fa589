"""The engine build: the LLaVA fix script, the run-time vision probe, doctor, and setup."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


fix = load_script("fix_llava_concat")
engine_build = load_script("engine_build")


@pytest.fixture(scope="module")
def upstream_llava(tmp_path_factory) -> Path:
    """The untouched upstream file, from the source distribution setup downloaded and cached."""
    sdist = engine_build.sdist_path()
    assert sdist.is_file(), "setup caches the pinned source distribution; run scripts/bootstrap.py"
    member = f"llama_cpp_python-{engine_build.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/{fix.RELATIVE_PATH}"
    dst = tmp_path_factory.mktemp("upstream")
    with tarfile.open(sdist) as tar:
        data = tar.extractfile(member).read()
    (dst / fix.RELATIVE_PATH).parent.mkdir(parents=True)
    (dst / fix.RELATIVE_PATH).write_bytes(data)
    return dst


def test_fix_swaps_exactly_the_class_token_concat(upstream_llava, tmp_path):
    before = (upstream_llava / fix.RELATIVE_PATH).read_text()
    assert fix.BUGGY in before, "the pinned release still has the bug this fix is for"
    tree = tmp_path / "llama.cpp"
    (tree / fix.RELATIVE_PATH).parent.mkdir(parents=True)
    (tree / fix.RELATIVE_PATH).write_text(before)
    assert fix.apply_fix(tree) == "applied"
    after = (tree / fix.RELATIVE_PATH).read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(changed) == 1 and changed[0][1].strip() == fix.FIXED
    # Idempotent: a second run (or an upstream release with the fix) applies nothing.
    assert fix.apply_fix(tree) == "already-fixed"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/fix_llava_concat.py"), str(tree)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "nothing applied" in proc.stdout


def test_fix_fails_loudly_when_upstream_changed(upstream_llava, tmp_path):
    tree = tmp_path / "llama.cpp"
    (tree / fix.RELATIVE_PATH).parent.mkdir(parents=True)
    text = (upstream_llava / fix.RELATIVE_PATH).read_text().replace(fix.BUGGY, "inp = build_cls(ctx0, inp);")
    (tree / fix.RELATIVE_PATH).write_text(text)
    with pytest.raises(fix.FixError, match="changed upstream"):
        fix.apply_fix(tree)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/fix_llava_concat.py"), str(tree)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "by hand" in proc.stderr
    assert (tree / fix.RELATIVE_PATH).read_text() == text, "a refused fix must not touch the file"
    missing = subprocess.run([sys.executable, str(ROOT / "scripts/fix_llava_concat.py"), str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_wheel_cache_key_tracks_version_fix_and_flags(monkeypatch):
    base = engine_build.build_key("")
    assert base == engine_build.build_key("")
    assert base != engine_build.build_key("-DGGML_CUDA=on")
    assert base.startswith(engine_build.LLAMA_CPP_PYTHON_VERSION)
    monkeypatch.setattr(engine_build, "FIX_ID", engine_build.FIX_ID + "-changed")  # another fix: another wheel
    assert engine_build.build_key("") != base
    monkeypatch.undo()
    monkeypatch.setattr(engine_build, "LLAMA_CPP_PYTHON_VERSION", "0.0.1")  # another engine version too
    assert engine_build.build_key("") != base and engine_build.build_key("").startswith("0.0.1-")
    monkeypatch.undo()
    assert engine_build.build_key("") == base


def test_wheel_cache_key_tracks_the_builds_own_cmake_files(monkeypatch, tmp_path):
    base = engine_build.build_key("")
    edited = tmp_path / "ggml_backend_exports.map"
    edited.write_bytes(engine_build.EXPORTS_MAP.read_bytes() + b"\n/* edited */\n")
    monkeypatch.setattr(engine_build, "EXPORTS_MAP", edited)
    assert engine_build.build_key("") != base


def test_backend_libraries_export_only_their_c_interface():
    """Issue 20's crash, at its root: a C++ shared library exports every template instance it holds,
    and libllama's calls into the C++ runtime were bound to libggml-cuda's copies. The engine's
    build (scripts/engine_exports.cmake) gives the GPU and RPC backends a version script: only
    ggml_* and gguf_* leave them. Every build here has the RPC backend, so the same script is
    checked on it (a CUDA build's libggml-cuda gets it too: 10 symbols, measured on a CUDA 13 build)."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    backends = [p for p in sorted(lib.glob("libggml-*.so.0"))
                if p.name.split(".")[0] in ("libggml-rpc", "libggml-cuda", "libggml-hip", "libggml-musa")]
    assert "libggml-rpc.so.0" in [p.name for p in backends], "setup builds the RPC backend"
    for path in backends:
        out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
        names = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
        others = [n for n in names if not n.startswith(("ggml_", "gguf_"))]
        assert names and not others, f"{path.name} exports {len(others)} more, e.g. {others[:3]}"
    # The control: libllama has no version script, and exports C++ template instances (so the check can fail).
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib / "libllama.so.0")], capture_output=True, text=True)
    assert any(line.split()[-1].startswith("_ZNSt") for line in out.stdout.splitlines() if line.strip())


def test_cuda_is_chosen_only_where_a_gpu_can_run_it(monkeypatch, tmp_path, capsys):
    """The plain setup builds for CUDA where an NVIDIA GPU and nvcc are both present; a toolkit
    without a driver (a CI runner) builds for the CPU; CMAKE_ARGS and --cpu-only decide over both."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", str(nvcc.parent))
    monkeypatch.setattr(engine_build, "NVIDIA_DRIVER", tmp_path / "no-driver")
    assert engine_build.engine_cmake_args(None) == "-DGGML_RPC=ON"
    driver = tmp_path / "version"
    driver.write_text("NVRM version: 580\n")
    monkeypatch.setattr(engine_build, "NVIDIA_DRIVER", driver)
    assert engine_build.engine_cmake_args(None) == f"-DGGML_CUDA=on -DCMAKE_CUDA_COMPILER={nvcc} -DGGML_RPC=ON"
    assert "building for CUDA" in capsys.readouterr().out
    assert engine_build.engine_cmake_args(None, cpu_only=True) == "-DGGML_RPC=ON"
    assert engine_build.engine_cmake_args("") == "-DGGML_RPC=ON"  # CMAKE_ARGS set, even empty, decides
    assert engine_build.engine_cmake_args("-DGGML_VULKAN=on") == "-DGGML_VULKAN=on -DGGML_RPC=ON"


def test_the_tools_come_from_the_engines_own_build():
    """One build: llama.cpp's tools (what every benchmark compares against) sit beside the very
    libraries installed for huatuo-local, byte for byte, and run."""
    import json

    import llama_cpp

    marker = json.loads((Path(sys.prefix) / engine_build.ENGINE_MARKER).read_text())
    tools = Path(marker["tools"])
    assert tools.parent == Path(marker["wheel"]).parent
    installed = Path(llama_cpp.__file__).parent / "lib"
    for lib in ("libllama.so.0", "libmtmd.so.0", "libggml.so.0", "libggml-cpu.so.0", "libggml-base.so.0"):
        assert (tools / lib).read_bytes() == (installed / lib).read_bytes(), lib
    for tool in engine_build.TOOLS:
        assert (tools / tool).is_file(), tool
    version = subprocess.run([str(tools / "llama-bench"), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "version" in (version.stdout + version.stderr)


def test_probe_passes_on_the_installed_engine():
    from huatuo_local.runtime.engine.probe import run_probe

    result = run_probe()
    assert result.ok, result
    assert result.verdict == "correct"
    assert result.max_abs_diff < 0.02 * result.scale


def test_probe_tells_the_bug_from_a_correct_encoder():
    """Both outcomes: the numpy model of the buggy graph is recognised and refused."""
    from huatuo_local.runtime.engine import probe

    w, image = probe.weights(), probe.probe_image()
    correct = probe.reference_embeddings(image, w)
    buggy = probe.reference_embeddings(image, w, class_token_last=True)
    assert np.abs(correct - buggy).max() > 0.5 * np.abs(correct).max(), "the probe must be decisive"
    ok = probe.classify(correct + 1e-3, correct, buggy, "lib")
    bad = probe.classify(buggy.astype(np.float32), correct, buggy, "lib")
    other = probe.classify(np.zeros_like(correct), correct, buggy, "lib")
    assert ok.ok and ok.verdict == "correct"
    assert not bad.ok and bad.verdict == "class-token-last bug" and "25814" in bad.detail
    assert not other.ok and other.verdict == "mismatch"


def test_images_are_refused_when_the_probe_fails(converted, monkeypatch, tmp_path):
    """Every image goes through the vision check before it is encoded (the scheduler's one path)."""
    from huatuo_local.runtime.core.session import Session
    from huatuo_local.runtime.engine import probe
    from huatuo_local.runtime.engine.engine import Engine, EngineError, EngineOptions
    from PIL import Image

    failing = probe.ProbeResult(False, "class-token-last bug", 3.9, 3.3, "/lib/libmtmd.so", "class token last")
    monkeypatch.setattr(probe, "check_library", lambda use_cache=True: failing)
    result = converted()
    image = tmp_path / "i.png"
    Image.new("RGB", (336, 336), (10, 20, 30)).save(image)
    with Engine(result.llm_path, result.mmproj_path, EngineOptions(n_ctx=1024)) as engine:
        session = Session(engine)
        with pytest.raises(EngineError, match="bootstrap.py.*--allow-unverified-vision"):
            session.ask("What is it?", [image])
        session.close()
    opts = EngineOptions(n_ctx=1024, allow_unverified_vision=True)
    with Engine(result.llm_path, result.mmproj_path, opts) as engine:
        session = Session(engine)
        reply = session.ask("What is it?", [image])
        assert reply.counters.images_encoded == 1 and "unverified" in (reply.warning or "")
        assert session.scheduler.vision_warning and "unverified" in session.scheduler.vision_warning
        session.close()


def test_doctor_reports_the_probe_and_the_build():
    import json

    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "vision probe     ok: correct" in proc.stdout
    assert any(line.startswith("GPU              ") for line in proc.stdout.splitlines()) and "RAM" in proc.stdout
    assert "huatuo-vision-7b" in proc.stdout
    report = json.loads(run_cli("doctor", "--json").stdout)
    assert report["probe"]["ok"] is True and report["engine_version"] == engine_build.LLAMA_CPP_PYTHON_VERSION
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))), "").split()
    if "avx2" in flags:  # the engine was built for this CPU (GGML_NATIVE): llama.cpp must say it uses AVX2
        assert "AVX2 = 1" in report["system_info"], report["system_info"]
    elif "asimd" in flags:
        assert "NEON = 1" in report["system_info"], report["system_info"]


def test_setup_from_a_clean_venv_with_a_warm_cache(tmp_path):
    """The README's setup path, into a brand-new environment: the cached wheel, then a passing probe."""
    venv = tmp_path / "venv"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bootstrap.py"), "--venv", str(venv), "--no-dev"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "engine: cached wheel" in proc.stdout, "a warm cache must not rebuild llama.cpp"
    doctor = subprocess.run([str(venv / "bin" / "huatuo-local"), "doctor"], capture_output=True, text=True,
                            timeout=300, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert doctor.returncode == 0, doctor.stderr
    assert "vision probe     ok: correct" in doctor.stdout


def test_a_wrong_source_folder_is_refused_in_one_line(tmp_path):
    """`engine_build.py --source` (the offline path) names the folder and the fix, before any build."""
    script = [sys.executable, str(ROOT / "scripts/engine_build.py"), "--source"]
    env = {"PATH": "/usr/bin:/bin", "HUATUO_LOCAL_WHEEL_CACHE": str(tmp_path / "cache"), "CMAKE_ARGS": ""}
    missing = subprocess.run([*script, str(tmp_path / "nowhere")], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "not an unpacked llama-cpp-python source" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr
    other = tmp_path / "llama_cpp_python-0.0.1"
    (other / "vendor" / "llama.cpp").mkdir(parents=True)
    (other / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.0.1\n")
    wrong = subprocess.run([*script, str(other)], capture_output=True, text=True, env=env)
    assert wrong.returncode == 1 and "is llama-cpp-python 0.0.1" in wrong.stderr and "pins" in wrong.stderr
    assert "Traceback" not in wrong.stderr and not any((tmp_path / "cache").rglob("*.whl"))
