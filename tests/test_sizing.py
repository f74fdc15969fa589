"""Issue 24: the memory a known model needs at each quant is llama.cpp's own, and `doctor` and `pull`
choose the best quant that fits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_cli
from huatuo_local.models.registry import GIB, KNOWN_MODELS
from huatuo_local.models.sizing import QUALITY_ORDER, best_quant, memory_needed
from real_shapes import logged_buffer_mib, planned_compute_bytes, write_sparse_llm

MIB_ROUNDING = 6 * 1024  # llama.cpp logs sizes in MiB to two decimals


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_the_registry_sizes_are_llama_cpps_for_the_real_shapes(name, tmp_path):
    """Each quant's file as llama.cpp's quantizer sizes the real shapes (its dry run; the file's data is a
    hole), and the compute buffers it plans for the default context on its CPU backend, flash attention off,
    in batches of 256 (a CPU run) and 512 (the GPU allowance: planned on the CPU, not measured on a GPU; see
    models/registry.py): what models/registry.py says."""
    from huatuo_local.convert.quantize import quantized_size

    known = KNOWN_MODELS[name]
    path = write_sparse_llm(tmp_path / "sparse.gguf", known.shape)
    assert path.stat().st_size > 10 * GIB and path.stat().st_blocks * 512 < 64 * 1024**2  # a hole
    for quant in QUALITY_ORDER:
        assert abs(quantized_size(path, quant) - known.llm_bytes[quant]) <= MIB_ROUNDING, quant
    assert abs(planned_compute_bytes(path, 8192, 256) - known.compute_bytes_cpu) <= MIB_ROUNDING
    assert abs(planned_compute_bytes(path, 8192, 512) - known.compute_bytes_gpu) <= MIB_ROUNDING


def test_the_kv_cache_is_what_llama_cpp_allocates(converted, tmp_path):
    """K and V for every layer and position, as llama.cpp allocates them (a converted model, a real context)."""
    from huatuo_local.models.registry import LlmShape
    from tiny_models import TinySpec

    spec = TinySpec(arch="llama", seed=30, layers=3, hidden=128, heads=4, kv_heads=2, ffn=256, tower="folder")
    model = converted(spec, "F16", "f16")
    shape = LlmShape("llama", 3, 128, 256, 4, 2, 704, False)
    found = logged_buffer_mib(model.llm_path, rb"KV buffer size\s*=\s*([0-9.]+) MiB", 4096, plan_only=False)
    assert found and abs(found[-1] * 1024**2 - shape.kv_bytes_per_token() * 4096) < 1024


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_the_best_quant_is_the_best_that_fits(name):
    known = KNOWN_MODELS[name]
    needs = [memory_needed(known, q).total for q in QUALITY_ORDER]
    assert needs == sorted(needs, reverse=True), "the order is best (largest) first"
    for quant, need in zip(QUALITY_ORDER, needs):
        assert best_quant(known, need).quant == quant
        below = best_quant(known, need - 1)
        assert below.quant != quant and (below.quant is None or needs[QUALITY_ORDER.index(below.quant)] < need)
        if below.stretch:  # a better quant with a smaller context and an 8-bit cache: it does fit then
            better, n_ctx = below.stretch
            assert memory_needed(known, better, n_ctx, kv_type="q8_0").total <= need - 1
            assert below.quant is None or QUALITY_ORDER.index(better) < QUALITY_ORDER.index(below.quant)
    laptop = best_quant(KNOWN_MODELS["huatuo-vision-7b"], int(6.5 * GIB))
    assert laptop.quant in ("Q4_K_M", "IQ4_XS"), laptop.describe()  # an 8 GB laptop with 6.5 GiB free


def test_doctor_chooses_each_models_best_quant_for_this_machine():
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["choices"]) == set(KNOWN_MODELS)  # every known model has its line (an empty loop proves nothing)
    for name, choice in report["choices"].items():
        known = KNOWN_MODELS[name]
        free = choice["free_gib"] * GIB
        gpu = choice["where"] == "GPU"  # a machine with a GPU chooses there when a quant fits its memory
        if gpu:
            assert report["gpus"] and abs(choice["free_gib"] - sum(g["free_gib"] for g in report["gpus"])) < 0.01
        else:
            assert abs(choice["free_gib"] - report["ram_available_gib"]) < 0.01
        fitting = [q for q in QUALITY_ORDER if memory_needed(known, q, gpu=gpu).total <= free]
        assert choice["quant"] == (fitting[0] if fitting else None)
        assert choice["also_fits"] == fitting[1:]
        assert report["recommended"]["quant"][name] == choice["quant"]
    text = run_cli("doctor").stdout
    assert re.search(r"huatuo-vision-7b +best here: \S+: needs [0-9.]+ GiB of [0-9.]+ GiB free RAM", text), text


def test_the_quality_doctor_and_pull_show_is_fidelity_mds():
    """Each quant's KL as `pull` makes it (Q4_K_M without a matrix, lower ones with the image+text one) is
    the figure in FIDELITY.md's tables (7B first, then 34B), and `describe` shows it."""
    from huatuo_local.models.sizing import MEASURED_KL

    text = (Path(__file__).resolve().parents[1] / "FIDELITY.md").read_text()
    for order, name in enumerate(("huatuo-vision-7b", "huatuo-vision-34b")):
        for quant, kl in MEASURED_KL[name].items():
            rows = [r.split("|") for r in text.splitlines() if r.startswith(f"| {quant} | ") and "GiB" in r]
            cells = [c.strip().strip("*") for c in rows[order]]
            assert float(cells[3] if quant == "Q4_K_M" else cells[5]) == kl, (name, quant)
            budget = memory_needed(KNOWN_MODELS[name], quant).total
            assert f"KL to F16 {kl:.3f}" in best_quant(KNOWN_MODELS[name], budget).describe(quant)
