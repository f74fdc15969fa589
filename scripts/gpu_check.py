#!/usr/bin/env python3
"""The GPU check, in three phases that each fit one call on a lent CUDA machine (at most 600 s a call, 15
minutes in all, no network, only $OUT and the output's last 12,000 characters coming back).

    python3 scripts/gpu_check.py --phase build   --dir /tmp/gc --deadline 540 \
        [--wheels .gpu/whl --source-tar .gpu/llama-src.tar.gz]
    python3 scripts/gpu_check.py --phase measure --dir /tmp/gc --deadline 540
    python3 scripts/gpu_check.py --phase test    --dir /tmp/gc --deadline 540
    REHEARSE=1 python3 scripts/gpu_check.py --phase build --dir /tmp/gc-rehearsal   # this CPU machine, tiny shapes

build:   the Python packages and this project into DIR/site (when --wheels is given: a machine without network),
         the engine built for CUDA (the GPUs' own architectures, Ninja) with its CMake tree kept in DIR, so a cut
         build resumes; then the benchmarks' model (7B shapes, random weights, Q4_K_M) made in DIR.
measure: doctor (a GPU must be listed), the self-test, decode and time to first token beside llama-bench and
         llama-mtmd-cli (bench/gpu.py), serving 1/16/64 clients beside llama-server (bench/serve.py).
test:    the fidelity, chat, serve, native, sampling and RPC-placement tests with every engine on the GPU
         (HUATUO_LOCAL_TEST_GPU=1), one step per file.

Every phase is resumable: DIR/state.json records each finished step, and a phase run again does only what is
missing (a step that was cut or failed runs again). `--deadline S` is the seconds this call may take: a step
that cannot finish in what is left (its estimate, or what it took last time) is skipped and says so, and a step
that runs is stopped before the deadline. Results go under $OUT (else DIR/out): gpu-check-PHASE.json (machine,
date, commit, each step's status, seconds and figures), logs/STEP.log, speed.json, serve.json, tests-*.xml and
BENCHMARKS-gpu.md (the sections bench/ would append to BENCHMARKS.md). Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARGIN_S = 15  # left before the deadline for writing the results


@dataclass
class Step:
    name: str
    estimate_s: float  # on a 16-core H200 box, estimated (no GPU run yet); the rehearsal's are its own
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    check: object = None  # (log text, Run) -> (ok, figures, detail)


class Run:
    """One call of the check: where things are, the clock, the state kept between calls."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rehearse = os.environ.get("REHEARSE") == "1" or args.rehearse
        self.dir = args.dir.resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = Path(os.environ.get("OUT") or self.dir / "out").resolve()
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.deadline if args.deadline else None
        self.state_file = self.dir / "state.json"
        try:
            self.state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            self.state = {}
        self.python = args.python
        self.site = (self.dir / "site") if args.wheels else None  # offline: everything installed there
        self.bench = self.dir / "bench"

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HUATUO_BENCH_FILE=str(self.out / "BENCHMARKS-gpu.md"))
        env["HUATUO_LOCAL_HOME"] = str(self.dir / "home")  # the check's own store, probe and prefix caches
        if self.site is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.site), env.get("PYTHONPATH", "")]).strip(os.pathsep)
            env["PATH"] = os.pathsep.join([str(self.site / "bin"), env.get("PATH", "")])
        if not self.rehearse:
            env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        source = self.source()
        if source is not None:  # tests/test_native.py reads llama.cpp's headers there
            env["HUATUO_LOCAL_ENGINE_SOURCE"] = str(source)
        env.update(extra or {})
        return env

    def source(self) -> Path | None:
        """The engine's unpacked source, when this check was given one."""
        if self.args.source_tar:
            return self.dir / "src" / "source"
        return self.args.source.resolve() if self.args.source else None

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".partial")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.state_file)


# --- the phases ----------------------------------------------------------------------------------------------

def shapes(run: Run) -> list[str]:
    return ["--tiny", "--depth", "2", "--workdir", str(run.bench)] if run.rehearse else [
        "--depth", "28", "--workdir", str(run.bench)]


def build_steps(run: Run) -> list[Step]:
    py = run.python
    steps = []
    if run.site is not None:
        steps.append(Step("packages", 60, [py, str(Path(__file__)), "--install-packages", "--dir", str(run.dir),
                                            "--wheels", str(run.args.wheels)]))
    source = []
    if run.args.source_tar:
        source = ["--source", str(run.dir / "src" / "source")]
        steps.append(Step("source", 30, [py, str(Path(__file__)), "--unpack", str(run.args.source_tar), "--dir",
                                          str(run.dir)]))
    elif run.args.source:
        source = ["--source", str(run.args.source)]
    cmake = os.environ.get("GPU_CMAKE_ARGS") or ("-DGGML_RPC=ON" if run.rehearse else "-DGGML_CUDA=on -DGGML_RPC=ON")
    target = ["--target", str(run.site)] if run.site is not None else []
    steps.append(Step("engine", 60 if run.rehearse else 420,
                      [py, str(ROOT / "scripts" / "engine_build.py"), "--install", *target, *source,
                       "--build-dir", str(run.dir / "engine-build")],
                      {"CMAKE_ARGS": cmake, "HUATUO_LOCAL_WHEEL_CACHE": os.environ.get(
                          "HUATUO_LOCAL_WHEEL_CACHE", "" if run.rehearse else str(run.dir / "engine-cache"))},
                      check_engine))
    steps.append(Step("model", 30 if run.rehearse else 180,
                      [py, str(ROOT / "bench" / "gpu.py"), *shapes(run), "--prepare", "model"]))
    return steps


def measure_steps(run: Run) -> list[Step]:
    py = run.python
    clients = ["1", "4"] if run.rehearse else ["1", "16", "64"]
    tokens = "16" if run.rehearse else "64"
    return [
        # Made in the build phase when its deadline allowed; else here, before anything is timed.
        Step("model", 30 if run.rehearse else 180, [py, str(ROOT / "bench" / "gpu.py"), *shapes(run), "--prepare",
                                                     "model"]),
        Step("doctor", 20, [py, "-m", "huatuo_local", "doctor", "--json"], check=check_doctor),
        Step("selftest", 30, [py, "-m", "huatuo_local", "doctor", "--selftest"], check=check_selftest),
        Step("speed", 60 if run.rehearse else 120,
             [py, str(ROOT / "bench" / "gpu.py"), *shapes(run), "--tokens", "16" if run.rehearse else "128",
              "--json", str(run.out / "speed.json")], check=check_json("speed.json")),
        Step("serve", 90 if run.rehearse else 180,
             [py, str(ROOT / "bench" / "serve.py"), "--ngl", "99", *shapes(run), "--tokens", tokens, "--rounds", "1",
              "--clients", *clients, "--ctx", "2048", "--json", str(run.out / "serve.json")],
             check=check_json("serve.json")),
    ]


# The tests that put the model on the GPU, one step per file (estimates on the H200 box; the rehearsal runs the
# same files, which the deadline mostly skips there).
TEST_FILES = {
    "tests-native": ("tests/test_native.py", 60),
    "tests-sampling": ("tests/test_sampling.py", 60),
    "tests-fidelity": ("tests/test_fidelity.py", 200),
    "tests-chat": ("tests/test_chat_cli.py", 200),
    "tests-serve": ("tests/test_serve.py", 120),
    "tests-rpc-placement": ("tests/test_rpc.py::test_the_line_at_load_says_where_each_layer_went_as_llama_cpp_put_it",
                            60),
}


def test_steps(run: Run) -> list[Step]:
    steps = []
    for name, (target, estimate) in TEST_FILES.items():
        xml = run.out / f"{name}.xml"
        steps.append(Step(name, estimate, [run.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", target,
                                           f"--junitxml={xml}"],
                          {"HUATUO_LOCAL_TEST_GPU": "0" if run.rehearse else "1"}, check_junit(xml)))
    return steps


PHASES = {"build": build_steps, "measure": measure_steps, "test": test_steps}


# --- what each step's output means ---------------------------------------------------------------------------

def check_engine(log: str, run: Run) -> tuple[bool, dict, str]:
    wheel = re.search(r"^wheel (.+)$", log, re.M)
    tools = re.search(r"^tools (.+)$", log, re.M)
    return bool(wheel and tools), {"wheel": wheel.group(1) if wheel else None,
                                   "tools": tools.group(1) if tools else None}, ""


def check_doctor(log: str, run: Run) -> tuple[bool, dict, str]:
    try:
        report = json.loads(log[log.index("{"):])
    except ValueError:
        return False, {}, "doctor --json printed no report"
    gpus = report.get("gpus") or []
    figures = {"gpus": [{"description": g.get("description"), "free_gib": g.get("free_gib"),
                         "total_gib": g.get("total_gib")} for g in gpus],
               "engine_build": report.get("engine_build"), "probe": report.get("probe"),
               "backends": report.get("backends"), "idle_backends": report.get("idle_backends")}
    if not gpus and not run.rehearse:
        return False, figures, ("no GPU listed (backends built in but idle: "
                                f"{report.get('idle_backends')}); see logs/engine.log for the build's CMAKE_ARGS")
    return True, figures, ""


def check_selftest(log: str, run: Run) -> tuple[bool, dict, str]:
    line = next((ln for ln in log.splitlines() if ln.startswith("selftest")), "")
    return " ok" in line or "passed" in line, {"line": line}, "" if line else "no selftest line"


def check_json(name: str):
    def check(log: str, run: Run) -> tuple[bool, dict, str]:
        try:
            data = json.loads((run.out / name).read_text())
        except (OSError, ValueError):
            return False, {}, f"{name} was not written"
        return True, {k: data[k] for k in ("ratios", "goals") if k in data}, ""
    return check


def check_junit(xml: Path):
    def check(log: str, run: Run) -> tuple[bool, dict, str]:
        try:
            text = xml.read_text()
        except OSError:
            return False, {}, "no junit report"
        counts = {k: int(v) for k, v in re.findall(r'\b(tests|failures|errors|skipped)="(\d+)"', text)[:4]}
        ok = counts.get("failures", 1) == 0 and counts.get("errors", 1) == 0 and counts.get("tests", 0) > 0
        return ok, counts, "" if ok else "failed: see logs"
    return check


# --- running a phase -----------------------------------------------------------------------------------------

def run_step(run: Run, step: Step) -> dict:
    """Run one step as its own process group, stopped before the deadline; its output to logs/STEP.log."""
    log_path = run.out / "logs" / f"{step.name}.log"
    left = run.left()
    timeout = None if left is None else max(1.0, left - MARGIN_S)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(step.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=run.env(step.env), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    seconds = round(time.monotonic() - t0, 1)
    text = log_path.read_text(errors="replace")
    if rc is None:
        return {"status": "cut", "seconds": seconds, "detail": f"stopped at the deadline after {seconds:.0f} s"}
    ok, figures, detail = step.check(text, run) if step.check else (rc == 0, {}, "")
    if rc != 0:
        ok, detail = False, detail or f"exit {rc}: {tail(text, 3)}"
    return {"status": "done" if ok else "failed", "seconds": seconds, "figures": figures, "detail": detail}


def tail(text: str, lines: int) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])[-400:]


def run_phase(run: Run, phase: str) -> dict:
    results: dict[str, dict] = {}
    for step in PHASES[phase](run):
        if run.args.steps and step.name not in run.args.steps:
            continue
        key = f"{phase}/{step.name}"
        kept = run.state.get(key)
        if kept and kept.get("status") == "done" and not run.args.again:
            results[step.name] = {**kept, "status": "done", "kept": True}
            say(f"{step.name}: done before ({kept.get('seconds')} s), kept")
            continue
        # What it took last time (a cut step's time is a lower bound) or the estimate, whichever is larger.
        need = max(step.estimate_s, (kept or {}).get("seconds", 0) if (kept or {}).get("status") != "cut" else 0)
        left = run.left()
        if left is not None and left - MARGIN_S < need:
            results[step.name] = {"status": "skipped", "seconds": 0,
                                  "detail": f"deadline: needs about {need:.0f} s, {max(0, left - MARGIN_S):.0f} s "
                                            "left; run the phase again to do it"}
            say(f"{step.name}: skipped ({results[step.name]['detail']})")
            continue
        say(f"{step.name}: running (about {need:.0f} s)")
        result = run_step(run, step)
        results[step.name] = result
        run.state[key] = result
        run.save()
        say(f"{step.name}: {result['status']} in {result['seconds']} s"
            + (f" — {result['detail']}" if result.get("detail") else ""))
    return results


def say(line: str) -> None:
    print(f"[gpu-check {dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {line}", flush=True)


def machine() -> dict:
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}", "gpus": []}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
            info["gpus"] = [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def commit() -> str:
    if os.environ.get("HUATUO_COMMIT"):
        return os.environ["HUATUO_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- helpers the build phase runs as steps -------------------------------------------------------------------

def install_packages(directory: Path, wheels: Path) -> int:
    """The wheels a machine without network lacks, and this project, into DIR/site (pip --target)."""
    site = directory / "site"
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    # Built from a copy: building in the checkout would leave build/ and *.egg-info there.
    project = directory / "project"
    shutil.rmtree(project, ignore_errors=True)
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", ".ruff_cache", ".gpu"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--target", str(site)]
    if files and subprocess.run([*pip, *files]).returncode != 0:
        return 1
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([*pip, "--no-build-isolation", str(project)], env=env).returncode


def unpack(tar_path: Path, directory: Path) -> int:
    """The engine's source (the payload's fixed and trimmed sdist) into DIR/src/source, once: kept as it is
    afterwards, so the CMake tree built from it stays valid."""
    dest = directory / "src" / "source"
    if (dest / "PKG-INFO").is_file():
        print(f"{dest}: already unpacked")
        return 0
    staging = directory / "src" / "partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(staging, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(staging)
    inner = next(p for p in staging.iterdir() if p.is_dir())
    inner.rename(dest)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"unpacked {tar_path} into {dest}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=list(PHASES))
    ap.add_argument("--dir", type=Path, default=Path("/tmp/huatuo-gpu-check"),
                    help="where the check keeps its state, build tree, model and (without $OUT) results")
    ap.add_argument("--deadline", type=float, default=0, help="seconds this call may take (0: no limit)")
    ap.add_argument("--python", default=sys.executable, help="the Python that runs the product and the tests")
    ap.add_argument("--wheels", type=Path, help="a folder of wheels to install into DIR/site (no network)")
    ap.add_argument("--source", type=Path, help="an unpacked llama-cpp-python source distribution")
    ap.add_argument("--source-tar", type=Path, help="the same as a .tar.gz (the GPU payload's llama-src.tar.gz)")
    ap.add_argument("--again", action="store_true", help="run the phase's steps even when done before")
    ap.add_argument("--steps", type=lambda v: v.split(","), help="only these steps of the phase (comma-separated)")
    ap.add_argument("--rehearse", action="store_true", help="as REHEARSE=1: the CPU, tiny shapes")
    ap.add_argument("--install-packages", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--unpack", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.install_packages:
        return install_packages(args.dir, args.wheels)
    if args.unpack:
        return unpack(args.unpack, args.dir)
    if args.phase is None:
        ap.error("give --phase build, measure or test")
    run = Run(args)
    say(f"phase {args.phase} in {run.dir}; results in {run.out}"
        + (f"; deadline {args.deadline:.0f} s" if args.deadline else "") + ("; REHEARSAL" if run.rehearse else ""))
    steps = run_phase(run, args.phase)
    report = {"phase": args.phase, "rehearsal": run.rehearse, "machine": machine(),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
              "seconds": round(time.monotonic() - run.t0, 1), "steps": steps}
    (run.out / f"gpu-check-{args.phase}.json").write_text(json.dumps(report, indent=2))
    failed = [n for n, r in steps.items() if r["status"] in ("failed", "cut")]
    missing = [n for n, r in steps.items() if r["status"] == "skipped"]
    say(f"phase {args.phase}: {len(steps) - len(failed) - len(missing)} done, {len(failed)} failed or cut "
        f"{failed}, {len(missing)} skipped {missing}; {report['seconds']:.0f} s")
    for name in failed:
        log = run.out / "logs" / f"{name}.log"
        print(f"--- {name} (last lines of {log}) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
