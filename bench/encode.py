"""Image encode time by mmproj type (F16, F32, Q8_0) on the full CLIP ViT-L/14-336 tower.

Uses the checkpoint `bench/runtime.py` wrote (real tower shapes, random weights); best and mean of
three encodes after one warm-up, same threads for each type.

    .venv/bin/python bench/encode.py [--workdir /tmp/huatuo-bench-runtime] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append, invocation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--depth", type=int, default=2, help="which of runtime.py's checkpoints to use")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from huatuo_local.convert.pipeline import convert
    from huatuo_local.runtime.engine.engine import Engine, EngineOptions
    from huatuo_local.runtime.images.loader import load_rgb, prepare

    work = args.workdir
    ckpt = work / f"ckpt-{args.depth}"
    if not (ckpt / "config.json").is_file():
        sys.exit(f"error: {ckpt}: run bench/runtime.py first (it writes the checkpoint)")
    rows = ["| mmproj type | file | encode, best of 3 | mean |", "|---|---|---|---|"]
    for kind in ("f16", "f32", "q8_0"):
        out = work / f"encode-{kind}"
        if not (out / "m-Q8_0.manifest.json").is_file():
            convert(ckpt, out, quant="Q8_0", mmproj_type=kind, name="m")
        mm = out / f"mmproj-m-{kind}.gguf"
        with Engine(out / "m-Q8_0.gguf", mm, EngineOptions(n_ctx=1024, n_threads=args.threads)) as engine:
            picture = prepare(load_rgb(work / "scan.png"), engine.vision)
            engine.image_embeddings(picture)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                engine.image_embeddings(picture)
                times.append(time.perf_counter() - t0)
        rows.append(f"| {kind} | {mm.stat().st_size / 1e6:.0f} MB | {min(times):.2f} s | {sum(times) / 3:.2f} s |")
    table = "\n".join(rows)
    if args.no_append:
        print(table)
    else:
        append("Image encode by mmproj type", f"`.venv/bin/just bench-encode` (= `{invocation()}`)",
               table, f"Full CLIP ViT-L/14-336 + projector, random weights, {args.threads} threads, libmtmd with "
               "its default flash attention.")


if __name__ == "__main__":
    main()
