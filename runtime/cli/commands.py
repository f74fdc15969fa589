"""The `huatuo-local` command: thin typer commands over the Python API."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from huatuo_local.models.errors import HuatuoError


def _plain_help() -> None:
    """Help in the words users know: `CHECKPOINT` and `IMAGES...` in usage lines, not typer 0.2x's
    `{src}`, and no Python types such as `<list[Path]>` beside arguments (their help says what they are)."""
    from typer import core

    def usage_name(self) -> str:
        name = self.metavar or self.display_name_raw.upper()
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")

    core.TyperArgument._usage_display_name = usage_name
    core.TyperArgument.display_type_rich = lambda self, ctx: None
    plain_type = core._TyperParameter.display_type
    core._TyperParameter.display_type = lambda self, ctx: re.sub(  # <list[Path]> → <path>: the option repeats
        r"<list\[(\w+)\]>", lambda m: f"<{m.group(1).lower()}>", plain_type(self, ctx))


_plain_help()

app = typer.Typer(
    name="huatuo-local",
    help="Run HuatuoGPT-Vision locally and offline through llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help text: rich markup would eat `[verify]`-style words and re-wrap the examples.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from huatuo_local import __version__

        typer.echo(f"huatuo-local {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Run HuatuoGPT-Vision locally and offline through llama.cpp."""


# The CLI's flag for each sampling setting (runtime/sampling.py's RANGES hold the limits).
_FLAGS = {"temperature": "--temperature", "repetition_penalty": "--repeat-penalty", "max_new_tokens": "--max-tokens",
          "top_k": "--top-k", "top_p": "--top-p", "min_new_tokens": "--min-tokens"}


def check_settings(**settings: float) -> None:
    """The same ranges the API enforces, named by their flags."""
    from huatuo_local.runtime.core.sampling import SamplingParams, SettingError

    try:
        SamplingParams(**settings).check()
    except SettingError as exc:
        fail(f"{_FLAGS[exc.setting]} {exc.detail}")


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# --rpc and --tensor-split, the same on chat, serve and eval
RpcOption = Annotated[str | None, typer.Option(help="llama.cpp RPC workers HOST:PORT[,HOST:PORT...] that hold some "
                                                    "layers (huatuo-local rpc-worker on each); the vision encoder "
                                                    "stays here.")]
TensorSplitOption = Annotated[str | None, typer.Option(help="With --rpc: shares of the layers, this machine first, "
                                                             "then each worker (e.g. 1,1,1; default: by free "
                                                             "memory).")]


def _shares(text: str | None, rpc: str | None) -> list[float] | None:
    """--tensor-split's numbers (this machine first, then each --rpc worker)."""
    if text is None:
        return None
    if not rpc:
        fail("--tensor-split needs --rpc")
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        fail(f"--tensor-split {text}: give numbers separated by commas, this machine's share first (e.g. 1,1,1)")
    return None


@app.command(epilog="Examples:\n\n  huatuo-local convert ./HuatuoGPT-Vision-7B --name huatuo-vision-7b   "
                   "(into the local store: then chat --model huatuo-vision-7b)\n\n"
                   "  huatuo-local convert FreedomIntelligence/HuatuoGPT-Vision-7B -o models/ --quant Q4_K_M")
def convert(
    src: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="Checkpoint folder, or a Hugging Face repo id "
                                                                  "to download.")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output folder for the GGUF pair and manifest "
                                                                 "(default: the local store, as --name).")] = None,
    quant: Annotated[str, typer.Option(help="LLM type: F32, F16, BF16, Q8_0, or a llama.cpp quant (Q6_K, "
                                            "Q5_K_M, Q4_K_M, ...).")] = "Q4_K_M",
    mmproj_type: Annotated[str, typer.Option(help="Vision projector type: f16, q8_0 or f32.")] = "f16",
    vision_tower: Annotated[str | None, typer.Option(help="CLIP tower folder or repo id, when the "
                                                             "checkpoint does not hold it.")] = None,
    name: Annotated[str | None, typer.Option(help="The model's name in the store (without -o), or the base name "
                                                  "of the output files (default: the checkpoint folder's name).")]
    = None,
    threads: Annotated[int, typer.Option(help="Quantizer threads (0: all cores).")] = 0,
) -> None:
    """Convert a HuatuoGPT-Vision checkpoint into NAME-QUANT.gguf + mmproj-NAME-TYPE.gguf."""
    from huatuo_local.convert.pipeline import convert as run_convert
    from huatuo_local.convert.pull import store_name_for
    from huatuo_local.models.store import store_folder
    from huatuo_local.runtime.cli.progress import StageProgress

    into_store = out is None
    if out is None:  # into the local store, where `list`, `chat --model NAME` and `rm` find it
        name = name or store_name_for(src)
        out = store_folder(name)
    with StageProgress() as bar:
        result = run_convert(src, out, quant=quant, mmproj_type=mmproj_type, vision_tower=vision_tower,
                             name=name, progress=bar.update, threads=threads)
    typer.echo(f"wrote {result.llm_path}")
    typer.echo(f"wrote {result.mmproj_path}")
    typer.echo(f"wrote {result.manifest_path}")
    if into_store:
        typer.echo(f"in the local store as {out.name}:{result.manifest.quant.lower()}; try: huatuo-local chat IMAGE "
                   f"--model {out.name}")


@app.command(epilog="Example: huatuo-local doctor --json")
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    selftest: Annotated[bool, typer.Option("--selftest", help="Also write, convert and chat with a tiny random "
                                                              "model (no download).")] = False,
    rpc: Annotated[str | None, typer.Option(help="Also ask these RPC workers (HOST:PORT,...) for their memory and "
                                            "show which quants fit across them and this machine.")] = None,
) -> None:
    """Check the install: engine build, the LLaVA vision probe, GPU offload, RAM and what fits."""
    import json
    from dataclasses import asdict

    from huatuo_local.runtime.cli.doctor import gather

    if selftest:
        from huatuo_local.runtime.cli import selftest as st

        result = st.run()
        where = "GPU (all layers)" if result.gpu_layers else "CPU"
        typer.echo(f"selftest         ok on {where}: converted a random model and generated {result.tokens} "
                   f"tokens in {result.seconds:.1f} s (random weights: the answer is meaningless)")

    from huatuo_local.runtime.rpc.client import parse_endpoints

    report = gather(rpc_endpoints=parse_endpoints(rpc) if rpc else None)
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=2))
    else:
        probe = report.probe
        status = "ok" if probe.get("ok") else "FAILED"
        lines = [
            f"huatuo-local     {report.version}",
            f"engine           llama-cpp-python {report.engine_version}"
            + (f" (CMAKE_ARGS={report.engine_build.get('cmake_args') or 'default'})" if report.engine_build else ""),
            f"vision probe     {status}: {probe.get('verdict')} (max |diff| {probe.get('max_abs_diff', 0):.2e} "
            f"on a scale of {probe.get('scale', 0):.2f})" + (f"; {probe['detail']}" if probe.get("detail") else ""),
            f"library          {probe.get('library')}",
            *([f"GPU              {g['name']}: {g['description']}, {g['free_gib']:.1f} GiB free of "
               f"{g['total_gib']:.1f} GiB" for g in report.gpus] or ["GPU              none (the CPU runs the model)"]),
            *[f"{ref:<16} {note}" for ref, note in (report.placements or {}).items()],
            f"RPC backend      {'built in (huatuo-local rpc-worker, --rpc)' if report.rpc else 'not built'}",
            f"CPU features     {report.system_info}",
            f"CPU cores        {report.physical_cores} physical, {report.logical_cores} logical (threads default to "
            "the physical count)",
            f"RAM              {report.ram_total_gib:.1f} GiB total, {report.ram_available_gib:.1f} GiB available",
        ]
        for name, fits in report.fits.items():
            ok = [q for q, f in fits.items() if f]
            lines.append(f"{name:<16} fits: {', '.join(ok) if ok else 'none of ' + ', '.join(fits)}")
        for w in report.workers or []:
            if "fits" in w:
                for name, fits in w["fits"].items():
                    ok = [q for q, f in fits.items() if f]
                    lines.append(f"{name:<16} fits across the workers and this machine ({w['free_gib']:.1f} GiB "
                                 f"free): {', '.join(ok) if ok else 'none'}")
            else:
                lines.append(f"RPC worker       {w['endpoint']}: {w['free_gib']:.1f} GiB free of "
                             f"{w['total_gib']:.1f} GiB")
        rec = report.recommended
        lines.append(f"recommended      -ngl {rec['n_gpu_layers']} --threads {rec['threads']}, quant "
                     + ", ".join(f"{k}: {v or 'too large'}" for k, v in rec["quant"].items()))
        typer.echo("\n".join(lines))
    if not report.probe.get("ok"):
        from huatuo_local.runtime.engine.probe import FIX_HINT

        typer.echo(f"error: the vision probe failed; {FIX_HINT}", err=True)
        raise typer.Exit(1)


@app.command(epilog="Examples:\n\n  huatuo-local chat scan.png -p \"What does this image show?\"\n\n"
                   "  huatuo-local chat ct.png mri.png            (interactive)\n\n"
                   "  echo \"Describe the findings\" | huatuo-local chat scan.png --json")
def chat(
    images: Annotated[list[Path] | None, typer.Argument(help="Images for the first question.")] = None,
    prompt: Annotated[str | None, typer.Option("-p", "--prompt", help="Ask one question and exit.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name, folder, manifest or "
                                                 ".gguf file (default: huatuo-vision-7b).")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option("-ngl", "--n-gpu-layers", help="Layers to offload "
                                                        "(default: all when a GPU is available).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the physical cores).")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context length in tokens (default: 8192, room for the "
                                                  "release's 6 images and a 512-token answer).")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy and deterministic.")] = 0.2,
    repeat_penalty: Annotated[float, typer.Option(help="Over generated tokens only, as the release.")] = 1.2,
    max_tokens: Annotated[int, typer.Option(help="Most new tokens per answer.")] = 512,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    kv_type: Annotated[str, typer.Option(help="KV cache type: f16, f32 or q8_0.")] = "f16",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (one-shot).")] = False,
    no_mmproj_offload: Annotated[bool, typer.Option("--no-mmproj-offload",
                                                    help="Keep the vision encoder on the CPU.")] = False,
    allow_unverified_vision: Annotated[bool, typer.Option("--allow-unverified-vision",
                                                          help="Answer even if the vision probe fails.")] = False,
    window: Annotated[str | None, typer.Option(help="Grayscale window: lung, mediastinum, bone, brain, abdomen, "
                                                    "liver, or CENTER,WIDTH (default: the file's, else 0.5-99.5%).")]
    = None,
    frame: Annotated[int | None, typer.Option(help="Frame of a multi-frame image (default: the middle one).")]
    = None,
    max_pixels: Annotated[int | None, typer.Option(help="Largest image accepted, in pixels (decompression-bomb "
                                                        "guard; default 178956970).")] = None,
    no_prefix_cache: Annotated[bool, typer.Option("--no-prefix-cache",
                                                  help="Do not keep encoded images on disk for the next run.")]
    = False,
    rpc: RpcOption = None,
    tensor_split: TensorSplitOption = None,
) -> None:
    """Ask HuatuoGPT-Vision about medical images, one-shot or interactively; nothing leaves this machine."""
    from huatuo_local.runtime.api import HuatuoChatbot

    paths = [str(p) for p in images or []]
    if prompt is not None and not prompt.strip():
        fail("-p: the question is empty; ask something, or leave -p out for the interactive chat")
    check_settings(temperature=temperature, repetition_penalty=repeat_penalty, max_new_tokens=max_tokens)
    from huatuo_local.runtime.images.dicom import parse_window
    from huatuo_local.runtime.images.loader import DEFAULT_MAX_PIXELS, LoadOptions, check_images

    # Every input is checked before the model loads (seconds and gigabytes): a typo fails at once.
    for note in check_images(paths, LoadOptions(parse_window(window), frame, max_pixels or DEFAULT_MAX_PIXELS)):
        typer.echo(note, err=True)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            fail("no question: give -p PROMPT or text on standard input")
    from huatuo_local.runtime.cli.progress import PromptStatus

    status = PromptStatus(enabled=None if not as_json else False)
    status.show(f"loading {model or 'huatuo-vision-7b'}…")
    try:
        bot = HuatuoChatbot(model, n_gpu_layers=n_gpu_layers, n_ctx=ctx, threads=threads, kv_type=kv_type,
                            mmproj_offload=not no_mmproj_offload, temperature=temperature,
                            repetition_penalty=repeat_penalty, max_new_tokens=max_tokens, seed=seed,
                            allow_unverified_vision=allow_unverified_vision, window=window, frame=frame,
                            max_pixels=max_pixels, prefix_cache=not no_prefix_cache, rpc=rpc,
                            tensor_split=_shares(tensor_split, rpc))
    finally:
        status.stop()
    if bot.engine.placement_note and not as_json:
        typer.echo(bot.engine.placement_note, err=True)
    if prompt is None:
        from huatuo_local.runtime.cli import repl

        raise typer.Exit(repl.run(bot, paths))
    if as_json:
        import json
        from dataclasses import asdict

        reply = bot.session.ask(prompt, paths)
        typer.echo(json.dumps({
            "answer": reply.text, "model": bot.model.name,
            "tokens": {"prompt": reply.prompt_positions, "generated": len(reply.tokens)},
            "timings": asdict(reply.timings), "counters": asdict(reply.counters),
            "session_counters": asdict(bot.counters), "warning": reply.warning,
        }, ensure_ascii=False, indent=2))
        return
    try:
        for piece in bot.stream(prompt, paths, on_progress=status):
            status.stop()  # the answer starts: the status line goes
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        status.stop()
    sys.stdout.write("\n")
    if bot.last_reply.warning:
        typer.echo(bot.last_reply.warning, err=True)


@app.command(epilog="Examples:\n\n  huatuo-local pull huatuo-vision-7b\n\n"
                   "  huatuo-local pull huatuo-vision-7b --quant Q8_0   (kept beside Q4_K_M as "
                   "huatuo-vision-7b:q8_0)\n\n"
                   "  huatuo-local pull ./HuatuoGPT-Vision-7B --name huatuo-vision-7b   (a checkpoint copied over)")
def pull(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="huatuo-vision-7b, huatuo-vision-34b, a Hugging Face "
                                                               "repo id, or a checkpoint folder on this machine.")],
    quant: Annotated[str | None, typer.Option(help="LLM quant (default: the model's, Q4_K_M).")] = None,
    name: Annotated[str | None, typer.Option(help="Name in the local store.")] = None,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit of the repository (default: main); "
                                                      "the commit is recorded in the manifest.")] = None,
) -> None:
    """Download a model (and convert it when needed) into the local store, or convert a checkpoint folder
    already on this machine into it. Converting a 7B needs about 2.5x its download size of free disk while it
    runs; pull checks before downloading."""
    from huatuo_local.convert.pull import pull as run_pull
    from huatuo_local.runtime.cli.progress import StageProgress

    with StageProgress() as bar:
        resolved = run_pull(model, quant, name, progress=bar.update, revision=revision)
    commit = f", commit {resolved.manifest.revision[:12]}" if resolved.manifest and resolved.manifest.revision else ""
    typer.echo(f"ready: {resolved.ref} ({resolved.llm_path.name}{commit}); "
               f"try: huatuo-local chat IMAGE --model {resolved.ref}")


@app.command(name="list", epilog="Example: huatuo-local list")
def list_cmd() -> None:
    """List the models in the local store ($HUATUO_LOCAL_HOME/models)."""
    from huatuo_local.models.store import list_models, models_dir

    found = list_models()
    if not found:
        typer.echo(f"no models in {models_dir()}; get one with: huatuo-local pull huatuo-vision-7b")
        return
    width = max(len(m.ref) for m in found)
    typer.echo(f"{'NAME':<{width}}  {'SIZE':>9}  FILES")
    for m in found:
        typer.echo(f"{m.ref:<{width}}  {m.size_bytes / 1024**3:5.2f} GiB  {m.llm_path.name} + {m.mmproj_path.name}")


@app.command(epilog="Examples:\n\n  huatuo-local info huatuo-vision-7b\n\n  huatuo-local info huatuo-vision-7b --json")
def info(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model name, folder, manifest or .gguf file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print every field as JSON.")] = False,
) -> None:
    """Show a model's files, source, quantization and checksums."""
    import json
    from dataclasses import asdict

    from huatuo_local.models.gguf_check import check_gguf
    from huatuo_local.models.store import resolve

    m = resolve(model)
    llm, mmproj = check_gguf(m.llm_path, "llm"), check_gguf(m.mmproj_path, "mmproj")
    data = asdict(m.manifest) if m.manifest else {"name": m.name}
    data.update({"ref": m.ref, "llm_path": str(m.llm_path), "mmproj_path": str(m.mmproj_path),
                 "llm_arch": llm.arch, "llm_tensors": len(llm.tensors), "mmproj_tensors": len(mmproj.tensors),
                 "size_bytes": m.size_bytes})
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    rows = [("model", m.ref), ("quant", data.get("quant") or "?"),
            ("size", f"{m.size_bytes / 1024**3:.2f} GiB"),
            ("language model", f"{m.llm_path} ({llm.arch}, {len(llm.tensors)} tensors)"),
            ("vision projector", f"{m.mmproj_path} ({data.get('mmproj_type') or '?'}, {len(mmproj.tensors)} tensors)"),
            ("source", data.get("source") or "?"), ("commit", data.get("revision") or "-"),
            ("converter", data.get("converter") or "?"),
            ("llm sha256", data.get("llm_sha256") or "-"), ("mmproj sha256", data.get("mmproj_sha256") or "-")]
    typer.echo("\n".join(f"{k:<17}{v}" for k, v in rows))


@app.command(epilog="Examples:\n\n  huatuo-local rm huatuo-vision-7b:q8_0\n\n"
                   "  huatuo-local rm huatuo-vision-7b --all --yes")
def rm(
    model: Annotated[str, typer.Argument(help="NAME or NAME:QUANT as `huatuo-local list` shows it.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    all_quants: Annotated[bool, typer.Option("--all", help="Every quant of NAME.")] = False,
) -> None:
    """Delete a model from the local store (only files its manifest lists; the shared mmproj stays while
    another quant uses it)."""
    from huatuo_local.models.store import plan_removal, remove

    targets, delete, kept = plan_removal(model, all_quants)
    size = sum(p.stat().st_size for p in delete if p.is_file() and not p.is_symlink()) / 1024**3
    names = ", ".join(m.ref for m in targets)
    if not yes:
        if not sys.stdin.isatty():  # a script or a pipe cannot answer: deleting needs a person or --yes
            fail(f"rm {model}: would delete {names} ({size:.2f} GiB); nothing deleted: confirm in a terminal, "
                 "or add --yes")
        if not typer.confirm(f"Delete {names} ({size:.2f} GiB: {', '.join(p.name for p in delete)})?"):
            typer.echo("nothing deleted", err=True)
            raise typer.Exit(1)
    done = remove(model, all_quants)
    typer.echo(f"removed {', '.join(done.refs)} ({done.bytes_freed / 1024**3:.2f} GiB freed)")
    for p in done.kept:
        typer.echo(f"kept {p.name} (another quant uses it)")


@app.command(epilog="Example: huatuo-local verify --original ./HuatuoGPT-Vision-7B models/ --images scan.png")
def verify(
    models: Annotated[list[str], typer.Argument(help="Converted models (folders, manifests or .gguf files).")],
    original: Annotated[Path, typer.Option(help="The original checkpoint folder.")],
    images: Annotated[list[Path], typer.Option(help="Images for the prompt (repeat the option).")],
    prompt: Annotated[str, typer.Option("-p", "--prompt")] = "What does the picture show?",
    tokens: Annotated[int, typer.Option(help="Greedy tokens to compare.")] = 32,
    vision_tower: Annotated[str | None, typer.Option(help="Tower folder, if not found from the checkpoint.")] = None,
) -> None:
    """Measure converted models against the original PyTorch model (needs the `verify` extra:
    pip install 'huatuo-local[verify]')."""
    from huatuo_local.runtime.verify.compare import format_table
    from huatuo_local.runtime.verify.compare import verify as run_verify

    rows = run_verify(original, models, [str(p) for p in images], prompt, tokens, vision_tower)
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
    tmp = target.with_name(f".{target.name}.partial")
    try:
        picture.save(tmp, format=kind)
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        fail(f"{target}: cannot write ({exc.strerror or exc}); choose another -o")
    typer.echo(f"wrote {target} ({picture.size[0]}x{picture.size[1]}, what the model sees)")


@app.command(epilog="Examples:\n\n  huatuo-local serve --model huatuo-vision-7b --parallel 4\n\n"
                   "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
                   "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'\n\n"
                   "  huatuo-local serve --host 0.0.0.0 --api-key-file ~/.huatuo-key   (reachable from the network)")
def serve(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name, folder, manifest or .gguf file "
                                                                    "(default: huatuo-vision-7b).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable by others.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    parallel: Annotated[int, typer.Option(help="Conversations answered at once (llama.cpp sequences).")] = 4,
    api_key: Annotated[str | None, typer.Option(help="Require Authorization: Bearer KEY. Other users of this "
                                                     "machine can read it in the process list: prefer "
                                                     "--api-key-file or HUATUO_LOCAL_API_KEY.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="Read the API keys from a file, one per line; each key "
                                                          "is its own tenant (its clients never share cached "
                                                          "work with another key's).")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option("-ngl", "--n-gpu-layers", help="Layers to offload "
                                                        "(default: all when a GPU is available).")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context per conversation in tokens (default 8192).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the physical cores).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests allowed to wait for a free sequence; more get 503.")]
    = 64,
    allow_files: Annotated[list[Path] | None, typer.Option(help="A folder whose images may be sent as file:// "
                                                                "URLs (repeat the option).")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(help="Allow browser pages from this origin "
                                                               "(repeat the option; default: none).")] = None,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Log prompt text (off: no patient text in "
                                                                     "logs).")] = False,
    no_prefix_cache: Annotated[bool, typer.Option("--no-prefix-cache",
                                                  help="Do not keep encoded images on disk.")] = False,
    max_body_mb: Annotated[int, typer.Option(help="Largest request body.")] = 64,
    max_image_mb: Annotated[int, typer.Option(help="Largest image in a request.")] = 32,
    max_pixels: Annotated[int | None, typer.Option(help="Largest image accepted, in pixels, the square it is "
                                                        "padded to included (default 50000000).")] = None,
    allow_unverified_vision: Annotated[bool, typer.Option("--allow-unverified-vision",
                                                          help="Answer even if the vision probe fails.")] = False,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
    rpc: RpcOption = None,
    tensor_split: TensorSplitOption = None,
) -> None:
    """Serve the model over an OpenAI-compatible API and a page at / (drop a scan, see what the model sees,
    ask), on this machine only unless --host says otherwise."""
    from huatuo_local.runtime.serve.server import serve as run_server
    from huatuo_local.runtime.serve.state import ServeConfig

    keys = _api_keys(api_key, api_key_file)
    if parallel < 1 or parallel > 64:
        fail("--parallel must be between 1 and 64")
    from huatuo_local.models.store import resolve

    resolve(model)  # a name that resolves to nothing fails now, in one line, not as a server that never works
    if rpc:
        from huatuo_local.runtime.serve.supervise import is_child, supervise

        if not is_child():  # llama.cpp aborts the process when a worker dies: keep the server up around it
            raise typer.Exit(supervise(sys.argv[1:], host, port))
    config = ServeConfig(
        model=model, host=host, port=port, parallel=parallel, api_keys=keys, n_gpu_layers=n_gpu_layers, ctx=ctx,
        threads=threads, max_queue=max_queue, allow_files=list(allow_files or []), cors_origins=list(cors_origin or []),
        log_prompts=log_prompts, prefix_cache=not no_prefix_cache, max_body_bytes=max_body_mb * 1024 * 1024,
        max_image_bytes=max_image_mb * 1024 * 1024, max_pixels=max_pixels,
        allow_unverified_vision=allow_unverified_vision, rpc=rpc, tensor_split=_shares(tensor_split, rpc))
    run_server(config, open_browser)


def _api_keys(flag: str | None, key_file: Path | None) -> list[str]:
    """The server's API keys: --api-key-file (one per line), else --api-key, else HUATUO_LOCAL_API_KEY."""
    import os

    if flag and key_file:
        fail("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            text = key_file.expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"{key_file}: cannot read the API keys ({getattr(exc, 'strerror', None) or exc})")
        keys = [line.strip() for line in text.splitlines() if line.strip()]
        if not keys:
            fail(f"{key_file}: empty; put one API key per line in it")
    elif flag:
        typer.echo("warning: --api-key is visible to other users of this machine in the process list; prefer "
                   "--api-key-file FILE or the HUATUO_LOCAL_API_KEY environment variable", err=True)
        keys = [flag.strip()]
    else:
        keys = [k for k in [os.environ.get("HUATUO_LOCAL_API_KEY", "").strip()] if k]
    # Any UTF-8 text works (the server compares the header's bytes), but not what a header cannot carry.
    if any(not k or not k.isprintable() or any(c.isspace() for c in k) for k in keys):
        fail("an API key may not be empty or hold spaces or control characters")
    return keys


@app.command(name="eval", epilog=(
    "Examples:\n\n"
    "  huatuo-local eval medical_multimodel_evaluation_data.json --model huatuo-vision-7b:q4_k_m\n\n"
    "  huatuo-local eval data.json --model huatuo-vision-7b:q8_0 --datasets VQA-RAD,SLAKE --limit 50 --greedy\n\n"
    "  huatuo-local eval data.json --model /shared/models/huatuo-vision-7b --ray auto --parallel 4\n\n"
    "  huatuo-local eval compare eval-runs/huatuo-vision-7b-q8_0 eval-runs/huatuo-vision-7b-q4_k_m"))
def eval_cmd(
    args: Annotated[list[str], typer.Argument(
        metavar="DATA.json | compare RUN_A RUN_B",
        help="The release's evaluation file (medical_multimodel_evaluation_data.json, images beside it), or "
             "`compare` and two run folders.")],
    model: Annotated[str | None, typer.Option("-m", "--model", help="Model name, folder, manifest or .gguf "
                                              "file (default: huatuo-vision-7b).")] = None,
    datasets: Annotated[str | None, typer.Option(help="Comma-separated datasets or model-card columns "
                                                 "(VQA-RAD,SLAKE,PathVQA,PMC-VQA,OmniMedVQA,MMMU); "
                                                 "default: all.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most N questions per dataset (a quick "
                                              "estimate).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder: answers (results.jsonl), results.json, "
                                             "results.md; rerun to continue (default: "
                                             "eval-runs/MODEL-QUANT).")] = None,
    greedy: Annotated[bool, typer.Option(help="Greedy decoding (deterministic) instead of the release's "
                                         "sampling (temperature 0.2, repetition penalty 1.2, seed 42).")] = False,
    parallel: Annotated[int, typer.Option(min=1, max=64, help="Questions answered at once (parallel "
                                          "sequences of one model).")] = 1,
    ray: Annotated[str | None, typer.Option(help="Spread the questions over a Ray cluster: its ADDRESS, "
                                            "`auto`, or `local` (a private one on this machine); needs "
                                            "huatuo-local[distributed].")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Ray workers (model replicas; default: one per "
                                                "machine).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads per model (default: the physical "
                                                "cores).")] = None,
    rpc: RpcOption = None,
    tensor_split: TensorSplitOption = None,
) -> None:
    """The model card's accuracy table for your model files, measured the way the release measures it."""
    from huatuo_local.runtime.eval import run as evaluate
    from huatuo_local.runtime.eval.results import RESULTS, read_rows

    if args and args[0] == "compare":
        if len(args) != 3:
            fail("usage: huatuo-local eval compare RUN_A RUN_B")
        from huatuo_local.runtime.eval.report import compare, compare_markdown

        rows = []
        for run_dir in args[1:]:
            path = Path(run_dir) / RESULTS
            if not path.is_file():
                fail(f"{run_dir}: no {RESULTS}; give two folders written by huatuo-local eval")
            rows.append(read_rows(path))
        typer.echo(compare_markdown(compare(*rows), args[1], args[2]), nl=False)
        return
    if len(args) != 1:
        fail("give one evaluation file (or: huatuo-local eval compare RUN_A RUN_B)")
    if workers and not ray:
        fail("--workers needs --ray")
    if rpc and ray:
        fail("give --ray (a model per machine) or --rpc (one model across machines), not both")
    try:
        folder, md = evaluate.run(
            Path(args[0]), model, out, [d for d in datasets.split(",")] if datasets else None, limit, parallel,
            greedy, ray, threads, show_progress=sys.stderr.isatty(), workers=workers, rpc=rpc,
            tensor_split=_shares(tensor_split, rpc))
    except KeyboardInterrupt:
        typer.echo("stopped: every answer so far is saved; run the same command again to continue", err=True)
        raise typer.Exit(130) from None
    typer.echo(md, nl=False)
    typer.echo(f"(written to {folder}/results.md and results.json)", err=True)


@app.command(name="rpc-worker", epilog=(
    "Examples:\n\n"
    "  huatuo-local rpc-worker --port 50052                 (this machine only; tunnel it, see README)\n\n"
    "  huatuo-local rpc-worker --host 10.0.0.2 --i-understand-rpc-is-unauthenticated   (a trusted network)"))
def rpc_worker(
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: a free one, printed).")] = 50052,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the physical cores).")] = None,
    device: Annotated[str, typer.Option(help="Device whose memory to lend: cpu, cuda0, metal, ...")] = "cpu",
    cache: Annotated[Path | None, typer.Option(help="Keep received weights in this folder (owner-only), so a "
                                               "restart does not receive them again.")] = None,
    acknowledged: Annotated[bool, typer.Option("--i-understand-rpc-is-unauthenticated",
                                               help="Listen on a non-loopback --host although the protocol has "
                                                    "no authentication or encryption.")] = False,
) -> None:
    """Lend this machine's memory to a model on another one (llama.cpp's RPC server, from the same library)."""
    from huatuo_local.runtime.rpc.worker import serve_worker, worker_refusal
    from huatuo_local.runtime.system import physical_cores

    refusal = worker_refusal(host, acknowledged)
    if refusal:
        fail(refusal)
    serve_worker(host, port, threads or physical_cores(), device, cache)


cache_app = typer.Typer(help="Show or clear the on-disk prefix cache (encoded images, derived from your scans).",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")


def _when(ts: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


@cache_app.command("info", epilog="Example: huatuo-local cache info")
def cache_info() -> None:
    """What the prefix cache holds: entries, bytes, oldest and newest, and where."""
    from huatuo_local.runtime.core.prefix_cache import info as cache_state

    state = cache_state()
    typer.echo(f"folder   {state.folder} (owner-only)")
    typer.echo(f"entries  {state.entries}")
    typer.echo(f"size     {state.bytes / 1024**2:.1f} MiB")
    typer.echo(f"oldest   {_when(state.oldest)}")
    typer.echo(f"newest   {_when(state.newest)}")


@cache_app.command("clear", epilog="Example: huatuo-local cache clear")
def cache_clear() -> None:
    """Delete every prefix cache entry (only the cache's own files)."""
    from huatuo_local.runtime.core.prefix_cache import clear

    gone = clear()
    typer.echo(f"removed {gone.entries} entries ({gone.bytes / 1024**2:.1f} MiB) from {gone.folder}")


def main() -> None:
    try:
        app(prog_name="huatuo-local")
    except HuatuoError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
