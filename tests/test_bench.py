"""The bench scripts stay runnable (tiny shapes, no timing assertions: figures live in BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def run_bench(script: str, *args: str, tmp_path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--tiny", "--no-append",
                           "--workdir", str(tmp_path / script), *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_convert_bench_runs(tmp_path):
    out = run_bench("convert.py", "--depths", "1", "2", "--no-llama-cpp", tmp_path=tmp_path)
    rows = [ln for ln in out.splitlines() if ln.startswith("| huatuo-local convert")]
    assert len(rows) == 2 and all("MB/s" in r and "GiB" in r for r in rows)


def test_runtime_bench_runs(tmp_path):
    out = run_bench("runtime.py", "--depths", "1", "2", "--quants", "Q8_0", "--no-llama-cpp", "--no-pytorch",
                    "--gen", "4", tmp_path=tmp_path)
    row = next(ln for ln in out.splitlines() if ln.startswith("| huatuo-local | Q8_0"))
    assert row.count("|") == 12 and "GiB" in row
    assert "Copy bandwidth measured in the same run" in out and "sgemm peak" in out
    # turn 1 was steered through a real answer, so turn 2 evaluates only the new turn's tokens
    new = int(row.split("s (")[1].split(" new)")[0])
    assert 0 < new < 40, row


def test_settings_bench_runs(tmp_path):
    out = run_bench("settings.py", "--depth", "1", "--quant", "Q8_0", "--rounds", "1", "--only", "default",
                    "flash attention on", "Q4_0 weights", tmp_path=tmp_path)
    rows = [ln for ln in out.splitlines() if ln.startswith(("| default", "| flash attention on", "| Q4_0"))]
    assert len(rows) == 3 and all(r.count("|") == 8 and "GiB" in r for r in rows)
    assert "n_ubatch" in out


def test_serve_bench_runs(tmp_path):
    # One client count alone (`--clients 16` crashed at its summary: issue 33).
    out = run_bench("serve.py", "--depth", "1", "--quant", "Q8_0", "--no-llama-server", "--tokens", "6",
                    "--rounds", "1", "--clients", "2", tmp_path=tmp_path)
    rows = [ln for ln in out.splitlines() if ln.startswith("| 2 |")]
    assert len(rows) == 1 and rows[0].count("|") == 4, out[-1500:]
    assert "while another client's image is read" in out and "GiB with 2" in out
    assert "aggregate with 2 clients = 1.00x 2 clients" in out


def test_cpu_wait_bench_runs(tmp_path):
    out = run_bench("cpu_wait.py", "--depth", "1", "--quant", "Q8_0", "--rounds", "1", "--gen", "4",
                    "--only", "libgomp default", "spin 1000 (", tmp_path=tmp_path)
    rows = [ln for ln in out.splitlines() if ln.startswith(("| libgomp default", "| spin 1000 (", "| llama-bench"))]
    assert len(rows) == 5 and all(r.count("|") == 7 for r in rows), out[-1500:]


def test_load_bench_runs(tmp_path):
    out = run_bench("settings.py", "--load", "--depth", "1", "--quant", "Q8_0", "--rounds", "1", "--no-llama-cpp",
                    "--pairs", "1", tmp_path=tmp_path)
    rows = [ln for ln in out.splitlines() if ln.startswith(("| read", "| mmap"))]
    assert len(rows) == 3 and all(r.count("GiB") == 4 and r.count("|") == 9 for r in rows), out[-1500:]
    assert "| huatuo-local chat |" in out
    # Where a one-shot run's time goes: each phase's end, in order, from the run's own trace.
    phases = [ln.split("|")[1].strip() for ln in out.split("phase ended at")[1].splitlines()[2:] if ln.startswith("| ")]
    for a, b in [("imports", "LLM loaded"), ("LLM loaded", "projector loaded"), ("projector loaded", "first token"),
                 ("first token", "process exit")]:
        assert phases.index(a) < phases.index(b), phases


def test_interactive_bench_runs(tmp_path):
    out = run_bench("runtime.py", "--interactive", "--depths", "1", "1", "--quants", "Q8_0", "--no-llama-cpp",
                    "--type-after", "0", "3", tmp_path=tmp_path)
    rows = [ln for ln in out.splitlines() if ln.startswith(("| 0 s", "| 3 s"))]
    assert len(rows) == 2 and "one-shot" in out, out[-1500:]


def test_eval_bench_runs(tmp_path):
    out = run_bench("eval.py", "--depth", "1", "--quant", "Q8_0", "--no-llama-cpp", "--questions", "8",
                    "--tokens", "2", tmp_path=tmp_path)
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "huatuo-local eval" in ln]
    assert len(rows) == 6 and all(" s | " in r and r.count("|") == 5 for r in rows), out[-1500:]


def test_rpc_bench_runs(tmp_path):
    out = run_bench("rpc.py", "--depth", "2", "--quant", "Q8_0", "--rounds", "1", tmp_path=tmp_path)
    rows = [ln for ln in out.splitlines() if ln.startswith(("| all", "| half", "| a third"))]
    assert len(rows) == 7 and all(r.count("|") == 9 for r in rows), out[-1500:]
    assert "| all layers on 2 workers | 2 |" in out and "| all layers on 2 workers, with a key (TLS) | 2 |" in out


def test_quants_bench_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quants.py"), "quality", "--tiny", "--no-append",
                           "--depth", "2", "--quants", "Q4_K_M", "IQ2_XS", "--tokens", "2", "--workdir",
                           str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(("| Q4_K_M |", "| IQ2_XS |"))]
    assert [r.split("|")[2].strip() for r in rows] == ["none", "text-only", "image+text", "text-only", "image+text"]
    assert "| importance matrix, image+text" in proc.stdout and "| quantize IQ2_XS with a matrix" in proc.stdout
    sizes = subprocess.run([sys.executable, str(ROOT / "bench" / "quants.py"), "sizes", "--no-append", "--workdir",
                            str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert sizes.returncode == 0 and "| huatuo-vision-34b |" in sizes.stdout, sizes.stderr[-2000:]


def test_gpu_bench_runs_on_the_cpu_too(tmp_path):
    """scripts/gpu_check.sh's speed step, on tiny shapes: llama.cpp's tools from the engine's own build,
    llama-bench at the answer's depth, and our time outside llama_decode."""
    out = run_bench("gpu.py", "--depth", "1", "--quant", "Q8_0", "--tokens", "16", tmp_path=tmp_path)
    decode = next(ln for ln in out.splitlines() if ln.startswith("| decode tok/s"))
    assert "llama-bench tg16 at depth " in decode and decode.count("|") == 5, decode
    outside = next(ln for ln in out.splitlines() if ln.startswith("| per token outside llama_decode"))
    assert float(outside.split("|")[2].split("ms")[0]) > 0, outside


def test_sampling_bench_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sampling.py")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(("| next_token", "| top-50"))]
    assert len(rows) == 4 and all(float(r.split("|")[2]) > 0 for r in rows), proc.stdout


def test_structured_bench_runs(tmp_path):
    """bench/structured.py on tiny shapes: both servers, without and with the schema, and the mask alone."""
    out = run_bench("structured.py", "--tokens", "24", tmp_path=tmp_path)
    rows = [ln for ln in out.splitlines() if ln.startswith(("| huatuo-local", "| llama-server"))]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0 and float(r.split("|")[3]) > 0 for r in rows), out
    assert "ms per token" in out


def test_cluster_bench_runs(tmp_path):
    """bench/cluster.py on tiny shapes: plain serve, 1 and 2 replicas, and the three follow-up routings."""
    out = run_bench("cluster.py", "--depth", "1", "--quant", "Q8_0", "--tokens", "6", "--rounds", "1", "--clients",
                    "2", "--conversations", "2", tmp_path=tmp_path)
    rows = [ln for ln in out.splitlines() if ln.startswith(("| plain serve", "| ray, ", "| affinity", "| pow2"))]
    assert len(rows) == 7, out
    assert "2 replicas / 1 replica" in out and "power of two choices / affinity" in out
