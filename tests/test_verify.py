"""`huatuo-local verify` on a tiny model at F32, F16, Q8_0 and Q4_K_M."""

from __future__ import annotations

import numpy as np
from conftest import run_cli
from PIL import Image
from tiny_models import TinySpec

# Rows of 256 so that llama.cpp's k-quants apply instead of falling back.
SPEC = TinySpec(arch="qwen2", hidden=256, heads=4, kv_heads=2, ffn=512, seed=21, tower="folder")


def test_verify_orders_the_quants(tiny, converted, tmp_path):
    info = tiny(SPEC)
    models = [converted(SPEC, q, "f32").manifest_path for q in ("F32", "F16", "Q8_0", "Q4_K_M")]
    img = tmp_path / "scan.png"
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((240, 320, 3)) * 255).astype(np.uint8)).save(img)
    proc = run_cli("verify", *map(str, models), "--original", str(info["ckpt"]), "--images", str(img),
                   "--tokens", "24")
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| tiny")]
    # NAME:QUANT, as the store names them (the manifests name the model "tiny")
    assert [r.split("|")[1].strip() for r in rows] == ["tiny:f32", "tiny:f16", "tiny:q8_0", "tiny:q4_k_m"]
    cells = [[c.strip() for c in r.split("|")[2:-1]] for r in rows]
    cosine = [float(c[0]) for c in cells]
    kl_mean = [float(c[2]) for c in cells]
    top1 = [float(c[4].rstrip("%")) for c in cells]
    assert all(c >= 0.99999 for c in cosine)
    assert kl_mean[0] < 1e-5, "F32 must be numerically the original"
    assert kl_mean[0] <= kl_mean[1] <= kl_mean[2] < kl_mean[3], kl_mean
    assert top1[0] == 100.0, top1  # F32 picks the original's token every time
    assert min(top1[1:]) >= 50.0, top1  # the quants still mostly agree (a broken quant path would not)
    noise = proc.stdout + proc.stderr
    assert "Traceback" not in noise and "You are using a model of type" not in noise, noise  # no library noise
