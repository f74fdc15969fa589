"""`huatuo-local chat`: one question (-p, or standard input), or the interactive chat."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from huatuo_local.runtime.cli.app import (
    RpcKeyOption,
    RpcOption,
    TensorSplitOption,
    _shares,
    app,
    check_settings,
    fail,
)


@app.command(epilog="Examples:\n\n  huatuo-local chat scan.png -p \"What does this image show?\"\n\n"
                   "  huatuo-local chat ct.png mri.png            (interactive)\n\n"
                   "  echo \"Describe the findings\" | huatuo-local chat scan.png --json")
def chat(
    images: Annotated[list[Path] | None, typer.Argument(help="Images for the first question.")] = None,
    prompt: Annotated[str | None, typer.Option("-p", "--prompt", help="Ask one question and exit.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name, folder, manifest or "
                                                 ".gguf file (default: huatuo-vision-7b).")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option("-ngl", "--n-gpu-layers", help="Layers to offload "
                                                        "(default: all when a GPU is available; 0: the CPU "
                                                        "only, also with --rpc).")] = None,
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
    rpc_key_file: RpcKeyOption = None,
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
                            tensor_split=_shares(tensor_split, rpc), rpc_key_file=rpc_key_file)
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
            "answer": reply.text, "model": bot.model.ref,
            "tokens": {"prompt": reply.prompt_positions, "generated": len(reply.tokens)},
            "timings": asdict(reply.timings), "counters": asdict(reply.counters),
            "session_counters": asdict(bot.counters), "warning": reply.warning,
        }, ensure_ascii=False, indent=2))
        return
    _print_answer(bot, prompt, paths, status)


def _print_answer(bot, prompt: str, paths: list[str], status) -> None:
    """Stream the answer to stdout as it comes; warnings to stderr."""
    from huatuo_local.runtime.cli.terminal import shown

    # On a terminal a control character in the answer is shown, never executed; a pipe gets the exact text.
    show = shown if sys.stdout.isatty() else str
    try:
        for piece in bot.stream(prompt, paths, on_progress=status):
            status.stop()  # the answer starts: the status line goes
            sys.stdout.write(show(piece))
            sys.stdout.flush()
    finally:
        status.stop()
    sys.stdout.write("\n")
    if bot.last_reply.warning:
        typer.echo(bot.last_reply.warning, err=True)
