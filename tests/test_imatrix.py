"""Issue 24: importance matrices from image and text prompts, and the low-bit quants that need them."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from tiny_models import TinySpec

SPEC = TinySpec(arch="qwen2", seed=8, tower="folder")
# Rows 256 wide: llama.cpp's IQ quants work on 256-value blocks (narrower rows fall back to other types).
WIDE = TinySpec(arch="qwen2", seed=12, tower="folder", hidden=256, heads=4, kv_heads=2, ffn=512)
TORCH_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("imatrix") / "scan.png"
    Image.fromarray((np.random.default_rng(21).random((200, 260, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_the_matrix_is_the_squared_inputs_pytorch_computes_image_positions_included(tiny, converted, scan):
    """Per column, the sums equal each layer input's squares summed over every position of the same
    prompts, recomputed independently in PyTorch (the release's path, forward hooks on every Linear);
    the counts are all the positions, the image's 576 included."""
    import torch
    from huatuo_local.models.prompt import IMAGE_TOKEN, Turn, render_prompt
    from huatuo_local.runtime.quantize import imatrix
    from huatuo_local.runtime.quantize.calibration import Conversation
    from reference import Reference

    model = converted(SPEC, "F32", "f32")
    conversations = [Conversation(scan, "What does the picture show?", "A small nodule in the right lung."),
                     Conversation(None, "Is a fever of 39 degrees worrying?", "It can be; see a doctor.")]
    ours = imatrix.compute(model.llm_path, model.mmproj_path, conversations)
    ref = Reference(tiny(SPEC))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    hooks = []
    for i, layer in enumerate(ref.llm.model.layers):
        for torch_name, gguf_name in TORCH_TO_GGUF.items():
            module = layer.get_submodule(torch_name)
            name = f"blk.{i}.{gguf_name}.weight"

            def hook(_module, inputs, _output, name=name):
                x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1]).numpy()
                sums[name] = sums.get(name, 0) + (x * x).sum(axis=0)
                counts[name] = counts.get(name, 0) + x.shape[0]

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for c in conversations:
            images = [str(c.image)] if c.image else []
            prompt = render_prompt([Turn(c.question, len(images), c.answer)], IMAGE_TOKEN)
            ref.llm(inputs_embeds=ref.prompt_embeds(prompt, images))
    for h in hooks:
        h.remove()
    assert set(ours.sums) == set(sums), set(ours.sums) ^ set(sums)
    for name in sums:
        assert ours.counts[name] == counts[name], name
        np.testing.assert_allclose(ours.sums[name], sums[name], rtol=2e-2, atol=1e-3, err_msg=name)
    assert ours.counts["blk.0.attn_q.weight"] > 576, "the image's positions count"
    text_only = imatrix.compute(model.llm_path, model.mmproj_path, [Conversation(None, c.question, c.answer)
                                                                   for c in conversations])
    # Without the image: its 576 positions and the line break the release writes after it are gone.
    assert text_only.counts["blk.0.attn_q.weight"] == ours.counts["blk.0.attn_q.weight"] - 576 - 1


def test_llama_cpp_reads_the_file_and_low_bit_quants_need_it(tiny, converted, scan, tmp_path):
    """The file is llama.cpp's imatrix format (its quantizer takes it); IQ quants refuse to run without
    one, in one line; with one they convert, load and answer."""
    from huatuo_local.models.imatrix import read_imatrix, write_imatrix
    from huatuo_local.runtime.quantize import calibration, imatrix

    f16 = converted(WIDE, "F16", "f16")
    matrix = imatrix.compute(f16.llm_path, f16.mmproj_path, calibration.bundled()[:4])
    path = tmp_path / "wide.imatrix.gguf"
    write_imatrix(path, matrix)
    again = read_imatrix(path)
    assert again.counts == matrix.counts and again.chunk_count == 4
    assert all(np.allclose(again.sums[n], matrix.sums[n], rtol=1e-6) for n in matrix.sums)
    ckpt = tiny(WIDE)["ckpt"]
    env = {"HUATUO_LOCAL_HOME": str(tmp_path / "home")}
    refused = run_cli("convert", str(ckpt), "--name", "wide", "--quant", "IQ2_XS", env=env)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        "error: --quant IQ2_XS needs an importance matrix: add --imatrix auto (computed from image and text "
        "prompts) or --imatrix FILE")
    assert not (tmp_path / "home" / "models" / "wide").exists()
    done = run_cli("convert", str(ckpt), "--name", "wide", "--quant", "IQ2_XS", "--imatrix", str(path), env=env)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(next((tmp_path / "home" / "models" / "wide").glob("*IQ2_XS.manifest.json")).read_text())
    assert manifest["quant"] == "IQ2_XS" and manifest["extra"]["imatrix"]["file"] == "wide.imatrix.gguf"
    chat = run_cli("chat", str(scan), "-p", "What is it?", "--model", "wide:iq2_xs", "--max-tokens", "4",
                   "--temperature", "0", env=env)
    assert chat.returncode == 0, chat.stderr


def test_convert_computes_the_matrix_itself(tiny, scan, tmp_path):
    """`convert --quant IQ3_XXS --imatrix auto`: the matrix from the bundled image+text conversations,
    saved beside the model in llama.cpp's format and named in the manifest."""
    from huatuo_local.models.imatrix import read_imatrix

    ckpt = tiny(WIDE)["ckpt"]
    env = {"HUATUO_LOCAL_HOME": str(tmp_path / "home")}
    proc = run_cli("convert", str(ckpt), "--name", "wide", "--quant", "IQ3_XXS", "--imatrix", "auto", env=env,
                   timeout=900)
    assert proc.returncode == 0, proc.stderr
    # Each bar counts what its stage counts (issue 33: "quantize Q4_K_M 27/27 bytes").
    assert "14/14 conversations" in proc.stderr and re.search(r"quantize IQ3_XXS .* (\d+)/\1 tensors", proc.stderr)
    assert not re.search(r"quantize.* bytes", proc.stderr), proc.stderr
    folder = tmp_path / "home" / "models" / "wide"
    saved = read_imatrix(folder / "wide.imatrix.gguf")
    assert saved.chunk_count == 14 and saved.counts["blk.0.attn_q.weight"] > 14 * 576
    manifest = json.loads((folder / "wide-IQ3_XXS.manifest.json").read_text())
    assert manifest["extra"]["imatrix"]["datasets"] == ["huatuo-local bundled calibration (14 image+text)"]
    assert not list(folder.glob("*F16*")), "the intermediate used for the matrix is gone"
    shown = run_cli("info", "wide", env=env)
    assert f"imatrix          {folder / 'wide.imatrix.gguf'} (from huatuo-local bundled calibration (14 image+text))" \
        in shown.stdout, shown.stdout
    chat = run_cli("chat", str(scan), "-p", "What is it?", "--model", "wide", "--max-tokens", "4", env=env)
    assert chat.returncode == 0, chat.stderr


def test_own_calibration_and_mistakes_get_one_line(tiny, scan, tmp_path):
    """`--calibration FOLDER` (the model answers its own questions) and `--calibration JSON`; mistakes
    are refused in one line before any work, leaving nothing behind."""
    from huatuo_local.runtime.quantize import calibration

    ckpt = tiny(WIDE)["ckpt"]
    env = {"HUATUO_LOCAL_HOME": str(tmp_path / "home")}
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "a.png").write_bytes(scan.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    own = calibration.from_user(folder)
    assert [(c.image.name, c.answer) for c in own] == [("a.png", "")]
    listed = tmp_path / "cal.json"
    listed.write_text(json.dumps([{"image": "mine/a.png", "question": "What is it?", "answer": "A scan."},
                                  {"question": "Is 39 degrees a fever?"}]))
    assert calibration.describe(calibration.from_user(listed), "cal.json") == "cal.json (1 image+text, 1 text-only)"
    release = tmp_path / "eval.json"  # the release's evaluation file: its query and its right letter
    release.write_text(json.dumps([
        {"question": "Which organ?", "options": ["Liver", "Lung"], "answer": "Lung", "image": ["mine/a.png"],
         "dataset": "VQA-RAD"},
        {"question": "Open?", "options": [], "answer": "x", "image": ["mine/a.png"], "dataset": "VQA-RAD"}]))
    [asked] = calibration.from_user(release)
    assert asked.image == folder / "a.png" and asked.answer == "B"
    assert asked.question.startswith("Which organ?\nA. Liver")
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"image": "nowhere.png", "question": "?"}]))
    cases = [
        (["--quant", "Q8_0", "--imatrix", "auto"], "error: --imatrix: Q8_0 is written directly"),
        (["--quant", "IQ3_XXS", "--calibration", str(folder)], "error: --calibration is used only to compute"),
        (["--quant", "IQ3_XXS", "--imatrix", str(tmp_path / "none.gguf")], f"error: {tmp_path / 'none.gguf'}"),
        (["--quant", "IQ3_XXS", "--imatrix", str(scan)], f"error: {scan}: not a GGUF file"),
        (["--quant", "IQ3_XXS", "--imatrix", "auto", "--calibration", str(missing)],
         f"error: {missing}: image {tmp_path / 'nowhere.png'} not found"),
        (["--quant", "IQ3_XXS", "--imatrix", "auto", "--calibration", str(tmp_path / "home")],
         "error: --calibration"),
    ]
    for args, start in cases:
        proc = run_cli("convert", str(ckpt), "--name", "wide", *args, env=env)
        assert proc.returncode == 1 and proc.stderr.startswith(start), (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "home" / "models" / "wide").exists(), args
    done = run_cli("convert", str(ckpt), "--name", "wide", "--quant", "IQ3_XXS", "--imatrix", "auto",
                   "--calibration", str(listed), env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "home" / "models" / "wide" / "wide-IQ3_XXS.manifest.json").read_text())
    assert manifest["extra"]["imatrix"]["datasets"] == ["cal.json (1 image+text, 1 text-only)"]


def test_rm_takes_the_matrix_with_the_last_quant_that_uses_it(tiny, tmp_path, monkeypatch):
    """The matrix is the model's file: kept while a quant made with it remains, deleted with the last."""
    from huatuo_local.models.imatrix import write_imatrix
    from huatuo_local.models.store import remove
    from huatuo_local.runtime.quantize import calibration, imatrix

    ckpt = tiny(WIDE)["ckpt"]
    home = tmp_path / "home"
    env = {"HUATUO_LOCAL_HOME": str(home)}
    f16 = run_cli("convert", str(ckpt), "--name", "wide", "--quant", "F16", env=env)
    assert f16.returncode == 0, f16.stderr
    folder = home / "models" / "wide"
    path = tmp_path / "m.imatrix.gguf"
    write_imatrix(path, imatrix.compute(folder / "wide-F16.gguf", folder / "mmproj-wide-f16.gguf",
                                        calibration.bundled()[:2]))
    for quant in ("IQ2_XS", "Q3_K_M"):
        proc = run_cli("convert", str(ckpt), "--name", "wide", "--quant", quant, "--imatrix", str(path), env=env)
        assert proc.returncode == 0, proc.stderr
    saved = folder / "wide.imatrix.gguf"
    assert saved.read_bytes() == path.read_bytes()
    monkeypatch.setenv("HUATUO_LOCAL_HOME", str(home))
    first = remove("wide:iq2_xs")
    assert saved.is_file() and saved in first.kept
    second = remove("wide:q3_k_m")
    assert saved in second.deleted and not saved.exists()


def test_verify_measures_quants_against_the_lossless_model(tiny, scan, tmp_path):
    """`verify --reference F16 QUANTS...` on held-out medical images: the reference against itself is
    exact; a 2-bit quant differs, measurably, and less than a model of other weights."""
    ckpt = tiny(WIDE)["ckpt"]
    env = {"HUATUO_LOCAL_HOME": str(tmp_path / "home")}
    for args in (["--quant", "F16"], ["--quant", "IQ2_XS", "--imatrix", "auto"]):
        proc = run_cli("convert", str(ckpt), "--name", "wide", *args, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
    other = run_cli("convert", str(tiny(TinySpec(arch="qwen2", seed=13, tower="folder", hidden=256, heads=4,
                                                 kv_heads=2, ffn=512))["ckpt"]), "--name", "other", "--quant", "F16",
                    env=env)
    assert other.returncode == 0, other.stderr
    proc = run_cli("verify", "--reference", "wide:f16", "wide:f16", "wide:iq2_xs", "other", "--tokens", "4",
                   env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = (float(cells[3]), float(cells[5].rstrip("%")), int(cells[6]))
    same, quant, foreign = rows["wide:f16"], rows["wide:iq2_xs"], rows["other:f16"]  # rows say NAME:QUANT
    assert same[0] == 0 and same[1] == 100.0 and same[2] >= 6, same  # six held-out prompts, >= 1 token each
    assert 0 < quant[0] < foreign[0], (quant, foreign)
    assert quant[2] == same[2] == foreign[2]
    mistakes = [(["wide:iq2_xs"], "error: give --original"),
                (["wide:iq2_xs", "--reference", "wide:f16", "--images", str(tmp_path / "no.png")], "error: ")]
    for args, start in mistakes:
        bad = run_cli("verify", *args, env=env)
        assert bad.returncode == 1 and bad.stderr.startswith(start) and "Traceback" not in bad.stderr, bad.stderr
    # Issue 36: a model of another shape gave a traceback; a reference that is not lossless went unremarked.
    small = run_cli("convert", str(tiny(TinySpec(seed=14))["ckpt"]), "--name", "small", "--quant", "F16", env=env)
    assert small.returncode == 0, small.stderr
    bad = run_cli("verify", "--reference", "wide:f16", "small", "--tokens", "2", env=env)
    assert bad.returncode == 1 and bad.stderr.strip().startswith(
        "error: small:f16 is not a quant of wide:f16's model (embedding width 64 vs 256)"), bad.stderr
    lossy = run_cli("verify", "--reference", "wide:iq2_xs", "wide:f16", "--tokens", "2", env=env, timeout=600)
    assert lossy.returncode == 0 and lossy.stderr.startswith(
        "note: the reference wide:iq2_xs is IQ2_XS, not lossless (F16, BF16 or F32)"), lossy.stderr


def test_the_matrix_is_owner_only(tiny, tmp_path):
    """Statistics of the user's own calibration conversations: written 0600 in the store (SECURITY.md)."""
    ckpt = tiny(WIDE)["ckpt"]
    home = tmp_path / "home"
    listed = tmp_path / "cal.json"
    listed.write_text(json.dumps([{"question": "Is 39 degrees a fever?", "answer": "Yes."}]))
    proc = run_cli("convert", str(ckpt), "--name", "wide", "--quant", "IQ2_XS", "--imatrix", "auto",
                   "--calibration", str(listed), env={"HUATUO_LOCAL_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert (home / "models" / "wide" / "wide.imatrix.gguf").stat().st_mode & 0o777 == 0o600


def test_hostile_matrices_are_refused_in_one_line_and_leave_nothing(tiny, converted, scan, tmp_path):
    """Issue 36: --imatrix FILE values were never checked: negative sums or counts made llama.cpp abort on
    IQ3_XXS (leaving the lossless intermediate behind), Q2_K silently got worse, NaN counts gave tracebacks,
    200,000 dataset names made a manifest the reader then refused, and a FIFO hung."""
    import hostile
    from huatuo_local.models.imatrix import read_imatrix
    from huatuo_local.runtime.quantize import calibration, imatrix

    f16 = converted(WIDE, "F16", "f16")
    good = imatrix.compute(f16.llm_path, f16.mmproj_path, calibration.bundled()[:2])
    ckpt = tiny(WIDE)["ckpt"]
    for name, matrix in hostile.hostile_matrices(good, hostile.write_matrix_raw).items():
        path = tmp_path / f"{name}.imatrix.gguf"
        hostile.write_matrix_raw(path, matrix)
        out = tmp_path / f"out-{name}"
        for quant in ("IQ3_XXS", "Q2_K"):
            proc = run_cli("convert", str(ckpt), "-o", str(out), "--quant", quant, "--imatrix", str(path))
            assert proc.returncode == 1, (name, quant, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), (name, proc.stderr)
            assert "Traceback" not in proc.stderr
            assert not out.exists() or not any(out.iterdir()), (name, sorted(p.name for p in out.iterdir()))
    fifo = tmp_path / "pipe.imatrix.gguf"
    os.mkfifo(fifo)
    proc = run_cli("convert", str(ckpt), "-o", str(tmp_path / "out-fifo"), "--quant", "Q2_K", "--imatrix", str(fifo),
                   timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {fifo}: not a regular file; give llama.cpp's " \
                                                            "imatrix GGUF file"
    # Names are shown printable only (no escape sequences reach a terminal through `info`).
    good.datasets = ["calib \x1b[2Jset\x07"]
    clean = tmp_path / "clean.imatrix.gguf"
    hostile.write_matrix_raw(clean, good)
    assert read_imatrix(clean).datasets == ["calib [2Jset"]


def test_hostile_calibration_files_get_one_line_before_any_work(tiny, scan, tmp_path):
    """Issue 36: calibration JSON bypassed the checked reader (200,000-deep nesting: RecursionError; a lone
    surrogate: UnicodeEncodeError; an 81 MB file read whole), `"image": 5` or a list was dropped silently, and
    FIFOs hung the readers."""
    import hostile

    shutil_scan = tmp_path / "files" / "scan.png"
    shutil_scan.parent.mkdir(parents=True)
    shutil_scan.write_bytes(scan.read_bytes())
    ckpt = tiny(WIDE)["ckpt"]
    env = {"HUATUO_LOCAL_HOME": str(tmp_path / "home")}
    for name, path in hostile.hostile_json(tmp_path / "files", "scan.png").items():
        proc = run_cli("convert", str(ckpt), "-o", str(tmp_path / "out"), "--quant", "IQ3_XXS", "--imatrix", "auto",
                       "--calibration", str(path), env=env, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {path}: "), (name, proc.stderr)
        assert not (tmp_path / "out").exists(), name  # refused before anything was written
    # A FIFO named like an image in a calibration folder is not an image (it would block the loader).
    folder = tmp_path / "images"
    folder.mkdir()
    os.mkfifo(folder / "scan.png")
    proc = run_cli("convert", str(ckpt), "-o", str(tmp_path / "out"), "--quant", "IQ3_XXS", "--imatrix", "auto",
                   "--calibration", str(folder), env=env, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"error: {folder}: no images in it"), proc.stderr
