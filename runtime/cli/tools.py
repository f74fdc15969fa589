"""`huatuo-local preview`, `verify` and `rpc-worker`: what the model sees, how close it is, lending memory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from huatuo_local.runtime.cli.app import app, fail
from huatuo_local.runtime.cli.options import model_options
from huatuo_local.runtime.core.config import ModelConfig


@app.command(epilog="Examples:\n\n  huatuo-local verify --original ./HuatuoGPT-Vision-7B models/ --images scan.png\n\n"
                   "  huatuo-local verify --reference huatuo-vision-7b:f16 huatuo-vision-7b:q4_k_m "
                   "huatuo-vision-7b:iq3_xxs   (what each quant costs; held-out medical images by default)")
# verify sets its own context, KV type and sequences (an f32 cache, 4096 positions, one sequence) so that
# its figures measure the model alone; the models are its arguments, and its workers are this machine.
@model_options(leave_out=("model", "ctx", "kv_type", "parallel", "prefix_cache", "rpc", "rpc_key_file",
                          "tensor_split"))
def verify(
    config: ModelConfig,
    models: Annotated[list[str], typer.Argument(metavar="MODEL", help="Converted models (names, folders, "
                                                                          "manifests or .gguf files).")],
    original: Annotated[Path | None, typer.Option(help="The original checkpoint folder: measure against the "
                                                       "release's PyTorch model.")] = None,
    reference: Annotated[str | None, typer.Option(help="A lossless conversion (F16, BF16, F32) of the same "
                                                       "checkpoint: measure quants against it, no PyTorch "
                                                       "needed.")] = None,
    images: Annotated[list[Path] | None, typer.Option(help="Images for the prompt (repeat the option); with "
                                                           "--reference, default: six held-out medical images, "
                                                           "each with its own question.")] = None,
    prompt: Annotated[str, typer.Option("-p", "--prompt")] = "What does the picture show?",
    tokens: Annotated[int, typer.Option(help="Greedy tokens to compare (per prompt).")] = 32,
    vision_tower: Annotated[str | None, typer.Option(help="Tower folder, if not found from the checkpoint.")] = None,
) -> None:
    """Measure converted models: against the original PyTorch model (--original; needs the `verify`
    extra: pip install 'huatuo-local[verify]'), or quants against a lossless conversion (--reference):
    image-embedding cosine, and with the reference's own answer fed back, per-token KL divergence and
    top-1 agreement."""
    from huatuo_local.runtime.verify.compare import format_table

    if (original is None) == (reference is None):
        fail("give --original CHECKPOINT (the PyTorch model) or --reference MODEL (a lossless conversion)")
    if tokens < 1:
        fail(f"--tokens {tokens}: give at least 1")
    for path in images or []:
        if not path.expanduser().is_file():
            fail(f"{path}: no such image; check the path")
    if reference is not None:
        from huatuo_local.runtime.quantize.calibration import held_out
        from huatuo_local.runtime.verify.quants import Prompt, compare_quants

        prompts = ([Prompt(list(images), prompt)] if images else
                   [Prompt([c.image] if c.image else [], c.question) for c in held_out()])
        rows = compare_quants(reference, models, prompts, tokens, config,
                              on_note=lambda note: typer.echo(note, err=True))
        typer.echo(format_table(rows))
        return
    from huatuo_local.runtime.verify.compare import verify as run_verify

    if not images:
        fail("--original needs --images: the images to ask about")
    rows = run_verify(original, models, [str(p) for p in images], prompt, tokens, vision_tower, config)
    typer.echo(format_table(rows))

_LOSSLESS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}  # preview -o: the pixels exactly

@app.command(epilog="Example: huatuo-local preview CT_small.dcm --window lung -o ct.png")
def preview(
    image: Annotated[Path, typer.Argument(help="PNG, JPEG, BMP, GIF, TIFF, WebP or DICOM file.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the picture (.png, .tif or .bmp).")],
    window: Annotated[str | None, typer.Option(help="lung, mediastinum, bone, brain, abdomen, liver, or "
                                                    "CENTER,WIDTH.")] = None,
    frame: Annotated[int | None, typer.Option(help="Frame of a multi-frame image.")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Largest image accepted, in pixels.")] = None,
) -> None:
    """Write exactly the picture the model will see (windowed, padded to square, resized to 336 px)."""
    from huatuo_local.models.towers import KNOWN_TOWERS
    from huatuo_local.runtime.images.dicom import parse_window
    from huatuo_local.runtime.images.loader import DEFAULT_MAX_PIXELS, LoadOptions, VisionInput, load_rgb, prepare

    tower = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]  # the tower of every HuatuoGPT-Vision model
    picture = prepare(load_rgb(image, LoadOptions(parse_window(window), frame, max_pixels or DEFAULT_MAX_PIXELS)),
                      VisionInput(tower.image_size, tower.image_mean))
    target = out.expanduser()
    kind = _LOSSLESS.get(target.suffix.lower())
    if kind is None:
        fail(f"{target}: write a lossless file (.png, .tif, .tiff or .bmp); a lossy format would change the "
             "pixels the model sees")
    import io

    from huatuo_local.models.private import write_private

    buf = io.BytesIO()
    picture.save(buf, format=kind)
    try:  # a patient's image: owner-only (0600), as transcripts and the prefix cache
        write_private(target, buf.getvalue())
    except OSError as exc:
        fail(f"{target}: cannot write ({exc.strerror or exc}); choose another -o")
    typer.echo(f"wrote {target} ({picture.size[0]}x{picture.size[1]}, what the model sees)")

@app.command(name="rpc-worker", epilog=(
    "Examples:\n\n"
    "  huatuo-local rpc-worker --init-key ~/.huatuo-rpc.key   (once; copy the file to each client, chmod 600)\n\n"
    "  huatuo-local rpc-worker --host 0.0.0.0 --key-file ~/.huatuo-rpc.key   (TLS; only key holders reach it)\n\n"
    "  huatuo-local rpc-worker --port 50052                 (no key: this machine only; tunnel it, see README)"))
def rpc_worker(
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: a free one, printed).")] = 50052,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the physical cores).")] = None,
    device: Annotated[str, typer.Option(help="Device whose memory to lend: cpu, cuda0, metal, ...")] = "cpu",
    cache: Annotated[Path | None, typer.Option(help="Keep received weights in this folder (owner-only), so a "
                                               "restart does not receive them again.")] = None,
    acknowledged: Annotated[bool, typer.Option("--i-understand-rpc-is-unauthenticated",
                                               help="Without --key-file: listen on a non-loopback --host although "
                                                    "the protocol has no authentication or encryption.")] = False,
    key_file: Annotated[Path | None, typer.Option(help="Accept only clients holding this key (TLS; the client "
                                                  "gives it as --rpc-key-file).")] = None,
    init_key: Annotated[Path | None, typer.Option(metavar="FILE", help="Make a new key file (owner-only) and "
                                                  "exit.")] = None,
) -> None:
    """Lend this machine's memory to a model on another one (llama.cpp's RPC server, from the same library)."""
    from huatuo_local.runtime.rpc.worker import serve_worker, worker_refusal
    from huatuo_local.runtime.system import physical_cores

    if init_key is not None:
        from huatuo_local.runtime.rpc.channel import make_key

        path = make_key(init_key)
        typer.echo(f"wrote {path} (owner-only): start workers with --key-file {path}; copy it to each client "
                   "(scp, then chmod 600) and give it there as --rpc-key-file")
        return
    refusal = worker_refusal(host, acknowledged, keyed=key_file is not None)
    if refusal:
        fail(refusal)
    serve_worker(host, port, threads or physical_cores(), device, cache, key_file)
