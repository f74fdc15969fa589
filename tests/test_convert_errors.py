"""Bad input to `huatuo-local convert`: one clear line, non-zero exit, nothing left behind."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from conftest import run_cli
from tiny_models import TinySpec


def copy_ckpt(info: dict, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(info["ckpt"], dst)
    return dst


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def assert_clean_failure(proc, out_dir, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for n in needles:
        assert n in last, f"{n!r} not in {last!r}"
    if out_dir.exists():
        assert not [p.name for p in out_dir.iterdir()], "a failed conversion must leave no file behind"


def _missing_config(ckpt):
    (ckpt / "config.json").unlink()


def _garbled_config(ckpt):
    (ckpt / "config.json").write_text('{"architectures": ["LlavaQwen2ForCausalLM"], "hidden_')


def _unknown_arch(ckpt):
    edit_config(ckpt, architectures=["MiniGPT4ForCausalLM"], model_type="minigpt4")


def _projector_linear(ckpt):
    edit_config(ckpt, mm_projector_type="linear")


def _projector_mlp3(ckpt):
    edit_config(ckpt, mm_projector_type="mlp3x_gelu")


def _shape_disagrees(ckpt):
    edit_config(ckpt, intermediate_size=96)


def _missing_shard(ckpt):
    (ckpt / "model-00002-of-00003.safetensors").unlink()


def _truncated(ckpt):
    shard = ckpt / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _garbage_weights(ckpt):
    (ckpt / "model-00001-of-00003.safetensors").write_bytes(b"\xff" * 64)


def _no_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()


CASES = [
    ("missing-config", _missing_config, ["config.json", "not found"]),
    ("garbled-config", _garbled_config, ["config.json", "not valid JSON"]),
    ("unknown-arch", _unknown_arch, ["config.json", "MiniGPT4ForCausalLM", "LlavaQwen2ForCausalLM"]),
    ("projector-linear", _projector_linear, ["config.json", "'linear'", "mlp2x_gelu"]),
    ("projector-mlp3x", _projector_mlp3, ["config.json", "'mlp3x_gelu'"]),
    ("shape-disagrees", _shape_disagrees, ["mlp.gate_proj.weight", "config.json"]),
    ("missing-shard", _missing_shard, ["model-00002-of-00003.safetensors", "missing"]),
    ("truncated", _truncated, ["model-00003-of-00003.safetensors", "truncated"]),
    ("garbage", _garbage_weights, ["model-00001-of-00003.safetensors"]),
    ("no-tokenizer", _no_tokenizer, ["no tokenizer"]),
]


@pytest.mark.parametrize("case,damage,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint_gives_one_clear_line(case, damage, needles, tiny, tmp_path):
    ckpt = copy_ckpt(tiny(TinySpec(shards=3)), tmp_path)
    damage(ckpt)
    out = tmp_path / "out"
    proc = run_cli("convert", str(ckpt), "-o", str(out), "--quant", "Q8_0")
    assert_clean_failure(proc, out, *needles)


def test_tower_not_found_says_how_to_give_it(tiny, tmp_path):
    info = tiny(TinySpec(tower="separate"))
    out = tmp_path / "out"
    proc = run_cli("convert", str(info["ckpt"]), "-o", str(out))
    assert_clean_failure(proc, out, "/nonexistent/tiny_clip", "--vision-tower")
    ok = run_cli("convert", str(info["ckpt"]), "-o", str(out), "--quant", "F16",
                 "--vision-tower", str(info["tower_dir"]), "--name", "given")
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in out.iterdir()) == ["given-F16.gguf", "given-F16.manifest.json",
                                                    "mmproj-given-f16.gguf"]


def test_missing_source_folder(tmp_path):
    proc = run_cli("convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert_clean_failure(proc, tmp_path / "out", "nope", "no such folder")


def test_unknown_quant_type(tiny, tmp_path):
    proc = run_cli("convert", str(tiny(TinySpec())["ckpt"]), "-o", str(tmp_path / "o"), "--quant", "Q3_X")
    assert_clean_failure(proc, tmp_path / "o", "Q3_X", "Q4_K_M")


def test_output_folder_not_writable(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli("convert", str(tiny(TinySpec())["ckpt"]), "-o", str(blocker / "out"), "--quant", "F16")
    assert_clean_failure(proc, tmp_path / "none", "a-file", "-o")


def test_disk_full_leaves_nothing(tiny, tmp_path, monkeypatch):
    """ENOSPC in the middle of the LLM file: one line, and both partial and finished files removed."""
    from huatuo_local.convert import write
    from huatuo_local.models.errors import HuatuoError

    real = write._chunks
    calls = {"n": 0}

    def failing(plan):
        for chunk in real(plan):
            calls["n"] += 1
            if calls["n"] > 60:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield chunk

    monkeypatch.setattr(write, "_chunks", failing)
    from huatuo_local.convert.pipeline import convert

    out = tmp_path / "out"
    with pytest.raises(HuatuoError, match="disk full"):
        convert(tiny(TinySpec())["ckpt"], out, quant="F16")
    assert not out.exists()  # as it was: the folder the convert made is gone with what it staged
