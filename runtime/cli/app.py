"""The `huatuo-local` typer application and what every command shares: flags, checks, the one-line error.

The commands live beside this module, one module per group (chat, store, serve, eval, doctor,
tools, cache); `runtime/cli/__init__.py` imports them so that they register on `app`.
"""

from __future__ import annotations

import os
import re
import sys
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
        from huatuo_local.version import __version__

        typer.echo(f"huatuo-local {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Run HuatuoGPT-Vision locally and offline through llama.cpp."""


# The CLI's flag for each sampling setting (core/sampling.py's RANGES hold the limits).
_FLAGS = {"temperature": "--temperature", "repetition_penalty": "--repeat-penalty", "max_new_tokens": "--max-tokens",
          "stop": "--stop"}


def check_settings(**settings) -> None:
    """The same ranges the API enforces, named by their flags."""
    from huatuo_local.runtime.core.sampling import SamplingParams, SettingError

    try:
        SamplingParams(**settings).check()
    except SettingError as exc:
        fail(f"{_FLAGS[exc.setting]} {exc.detail}")


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


INTERRUPTED = 130  # typer turns Ctrl-C (and SIGTERM during a convert) into this exit status


def main() -> None:
    try:
        app(prog_name="huatuo-local")
    except HuatuoError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        interrupted()
    except SystemExit as exc:
        if exc.code == INTERRUPTED:
            interrupted()
        raise


def interrupted(message: str = "interrupted") -> None:
    """End the process after Ctrl-C (or SIGTERM during a convert) with `message` and status 130.

    Everything staged was removed while the interrupt unwound; native work still running in a worker thread
    (llama.cpp's quantizer, models/interrupt.py) cannot be stopped, so the process ends here (os._exit: no
    buffered stream is flushed for us, hence the flushes)."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(INTERRUPTED)

