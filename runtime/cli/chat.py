"""`huatuo-local chat`: one question (-p, or standard input), or the interactive chat."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from huatuo_local.models import defaults
from huatuo_local.models.notice import NOTICE
from huatuo_local.runtime.cli.app import app, check_settings, fail
from huatuo_local.runtime.cli.options import model_options
from huatuo_local.runtime.core.config import ModelConfig


@app.command(epilog="Examples:\n\n  huatuo-local chat scan.png -p \"What does this image show?\"\n\n"
                   "  huatuo-local chat ct.png mri.png            (interactive)\n\n"
                   "  echo \"Describe the findings\" | huatuo-local chat scan.png --json\n\n"
                   "  huatuo-local chat scan.png -p \"Report\" --json-schema finding.schema.json   (a JSON answer)\n\n"
                   "  huatuo-local chat study/ --series 2 --slices auto --montage 3x3 -p \"Any nodules?\"   (a DICOM "
                   "study: folder, .zip or DICOMDIR)\n\n" + NOTICE)
@model_options(leave_out=("parallel",))
def chat(
    config: ModelConfig,
    images: Annotated[list[Path] | None, typer.Argument(help="Images for the first question.")] = None,
    prompt: Annotated[str | None, typer.Option("-p", "--prompt", help="Ask one question and exit.")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy and deterministic.")] = defaults.TEMPERATURE,
    repeat_penalty: Annotated[float, typer.Option(help="Over generated tokens only, as the release.")]
    = defaults.REPETITION_PENALTY,
    max_tokens: Annotated[int, typer.Option(help="Most new tokens per answer.")] = defaults.MAX_NEW_TOKENS,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="End the answer before this text (repeat for up to 4).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (one-shot).")] = False,
    json_schema: Annotated[Path | None, typer.Option(help="Every answer a JSON document valid against this JSON "
                                                         "Schema file, enforced while sampling.")] = None,
    window: Annotated[str | None, typer.Option(help="Grayscale window: lung, mediastinum, bone, brain, abdomen, "
                                                    "liver, or CENTER,WIDTH (default: the file's, else 0.5-99.5%).")]
    = None,
    frame: Annotated[int | None, typer.Option(help="Frame of a multi-frame image (default: the middle one).")]
    = None,
    max_pixels: Annotated[int | None, typer.Option(help="Largest image accepted, in pixels (decompression-bomb "
                                                        "guard; default 178956970).")] = None,
    series: Annotated[str | None, typer.Option(help="A study's series: its number or SeriesInstanceUID (a study of "
                                                    "several series lists them).")] = None,
    slices: Annotated[str | None, typer.Option(help="A study's slices: auto (evenly spaced: one, or one per montage "
                                                    "cell), auto:N, a range 40:80:10, or indices 12,30,45.")] = None,
    montage: Annotated[str | None, typer.Option(help="Tile a study's chosen slices into one image of ROWSxCOLUMNS, "
                                                     "each labelled with its slice and position, e.g. 3x3.")] = None,
) -> None:
    """Ask HuatuoGPT-Vision about medical images or DICOM studies, one-shot or interactively; nothing leaves
    this machine. Research software, not a medical device: answers may be wrong."""
    from huatuo_local.runtime.api import HuatuoChatbot
    from huatuo_local.runtime.trace import mark

    mark("imports")
    paths = [str(p) for p in images or []]
    if prompt is not None and not prompt.strip():
        fail("-p: the question is empty; ask something, or leave -p out for the interactive chat")
    check_settings(temperature=temperature, repetition_penalty=repeat_penalty, max_new_tokens=max_tokens,
                   stop=tuple(stop or ()))
    schema = _schema(json_schema) if json_schema is not None else None
    from huatuo_local.runtime.images.dicom import parse_window
    from huatuo_local.runtime.images.loader import DEFAULT_MAX_PIXELS, LoadOptions, expand_inputs, load_checked
    from huatuo_local.runtime.images.study import parse_montage

    # Every input is checked before the model loads (seconds and gigabytes): a typo fails at once. A study
    # becomes its chosen pictures here, once.
    options = LoadOptions(parse_window(window), frame, max_pixels or DEFAULT_MAX_PIXELS, series, slices,
                          parse_montage(montage))
    inputs = expand_inputs(paths, options)
    pictures, notes = load_checked(inputs, options)
    for note in notes:
        typer.echo(note, err=True)
    mark("images checked")
    prompt = _question(prompt)
    from huatuo_local.runtime.cli.progress import PromptStatus

    status = PromptStatus(enabled=None if not as_json else False)
    status.show(f"loading {config.model or 'huatuo-vision-7b'}…")
    try:
        bot = HuatuoChatbot(config=config, temperature=temperature, repetition_penalty=repeat_penalty,
                            max_new_tokens=max_tokens, seed=seed, stop=stop, schema=schema, window=window,
                            frame=frame, max_pixels=max_pixels, series=series, slices=slices, montage=montage,
                            prefetch_images=pictures)  # encoded while the LLM loads
    finally:
        status.stop()
    mark("model loaded")
    if bot.load_note and not as_json:
        typer.echo(bot.load_note, err=True)
    if prompt is None:
        from huatuo_local.runtime.cli import repl

        raise typer.Exit(repl.run(bot, inputs))
    if as_json:
        import json
        from dataclasses import asdict

        reply = bot.session.ask(prompt, inputs)
        typer.echo(json.dumps({
            "answer": reply.text, "model": bot.model.ref,
            "tokens": {"prompt": reply.prompt_positions, "generated": len(reply.tokens)},
            "finish_reason": reply.finish_reason,
            "timings": asdict(reply.timings), "counters": asdict(reply.counters),
            "session_counters": asdict(bot.counters), "warning": reply.warning, "record": reply.record,
        }, ensure_ascii=False, indent=2))
        _leave(bot)
    _print_answer(bot, prompt, inputs, status)
    mark("answer")
    _leave(bot)


def _question(prompt: str | None) -> str | None:
    """-p, else standard input when it is not a terminal, else None (the interactive chat)."""
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            fail("no question: give -p PROMPT or text on standard input")
    return prompt


def _leave(bot) -> None:
    """The one-shot answer is out: stop the scheduler (its thread finishes any prefix-cache write first), then
    exit without handing the model's memory back piece by piece (gigabytes of buffers; the process's end frees
    them at once): over half a second of a one-shot run at 7B (bench/settings.py --load)."""
    bot.session.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _schema(path: Path) -> dict:
    """--json-schema FILE, read and compiled before the model loads: a schema that cannot be enforced is one
    line naming the file and the construct."""
    from huatuo_local.models.errors import HuatuoError
    from huatuo_local.models.jsonfile import read_json
    from huatuo_local.runtime.core.structured import Grammar, SchemaError

    schema = read_json(path, "give a JSON Schema file", expect=dict, max_bytes=1 << 20, error=HuatuoError)
    try:
        Grammar.json_schema(schema)
    except SchemaError as exc:
        fail(f"--json-schema {path}: {exc}")
    return schema


def _print_answer(bot, prompt: str, paths: list, status) -> None:
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
