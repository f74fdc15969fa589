"""scripts/gpu_check.sh rehearsed on this CPU machine (REHEARSE=1), all three phases end to end, as a lent CUDA
machine would run them: results under $OUT with the keys the GPU run fills, a phase run again does only what is
missing, and a deadline too short for a step skips it and says so."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import ROOT


def check(tmp_path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = dict(os.environ, REHEARSE="1", OUT=str(out))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dir", str(tmp_path / "gc"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    phase = args[args.index("--phase") + 1]
    report = json.loads((out / f"gpu-check-{phase}.json").read_text())
    return proc, report


def test_the_three_phases_rehearsed_with_a_deadline(tmp_path):
    wheels = tmp_path / "wheels"  # nothing to add here: the project and the engine still go into DIR/site
    wheels.mkdir()
    proc, build = check(tmp_path, "--phase", "build", "--deadline", "500", "--wheels", str(wheels))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert {k for k in build} >= {"phase", "rehearsal", "machine", "date", "commit", "seconds", "steps"}
    assert build["rehearsal"] is True and len(build["commit"]) == 40
    assert [n for n, s in build["steps"].items() if s["status"] == "done"] == ["packages", "engine", "model"], build
    assert build["steps"]["engine"]["figures"]["tools"]
    site = tmp_path / "gc" / "site"
    assert (site / "huatuo_local").is_dir() and (site / "llama_cpp" / "lib").is_dir()

    proc, measure = check(tmp_path, "--phase", "measure", "--deadline", "500", "--wheels", str(wheels))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = measure["steps"]
    assert [n for n, s in steps.items() if s["status"] == "done"] == ["model", "doctor", "selftest", "speed", "serve"]
    assert "gpus" in steps["doctor"]["figures"] and steps["selftest"]["figures"]["line"].startswith("selftest")
    out = tmp_path / "out"
    speed = json.loads((out / "speed.json").read_text())
    assert {"machine", "date", "ours", "llama_bench", "llama_mtmd_cli", "ratios", "goals"} <= set(speed)
    assert speed["ratios"]["decode"] > 0 and speed["ratios"]["ttft"] > 0
    serve = json.loads((out / "serve.json").read_text())
    assert set(serve["results"]) == {"huatuo-local", "llama-server"} and set(serve["ratios"]) == {"1", "4"}
    sections = (out / "BENCHMARKS-gpu.md").read_text()
    assert "## GPU: 2 layers" in sections and "## Serve:" in sections  # what BENCHMARKS.md would get
    for name in ("doctor", "speed", "serve"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0

    # Again: nothing measured twice.
    proc, again = check(tmp_path, "--phase", "measure", "--deadline", "500", "--wheels", str(wheels))
    assert proc.returncode == 0 and all(s.get("kept") for s in again["steps"].values()), again
    assert again["seconds"] < 30

    # The test phase with a fake deadline: one step fits, the others are skipped and say why.
    proc, tests = check(tmp_path, "--phase", "test", "--deadline", "80", "--wheels", str(wheels),
                        "--steps", "tests-sampling,tests-fidelity")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    sampling, fidelity = tests["steps"]["tests-sampling"], tests["steps"]["tests-fidelity"]
    assert sampling["status"] == "done" and sampling["figures"]["tests"] > 0 and sampling["figures"]["failures"] == 0
    assert fidelity["status"] == "skipped" and fidelity["detail"].startswith("deadline: needs about 200 s")
    assert "tests-fidelity: skipped (deadline" in proc.stdout
    assert (out / "tests-sampling.xml").is_file()
