"""The `huatuo-local` command: thin typer commands over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from huatuo_local.models.errors import HuatuoError

app = typer.Typer(
    name="huatuo-local",
    help="Run HuatuoGPT-Vision locally and offline through llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command(epilog="Example: huatuo-local convert FreedomIntelligence/HuatuoGPT-Vision-7B -o models/ --quant Q4_K_M")
def convert(
    src: Annotated[str, typer.Argument(help="Checkpoint folder, or a Hugging Face repo id to download.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder for the GGUF pair and manifest.")],
    quant: Annotated[str, typer.Option(help="LLM type: F32, F16, BF16, Q8_0, or a llama.cpp quant (Q6_K, "
                                            "Q5_K_M, Q4_K_M, ...).")] = "Q4_K_M",
    mmproj_type: Annotated[str, typer.Option(help="Vision projector type: f16, q8_0 or f32.")] = "f16",
    vision_tower: Annotated[Optional[str], typer.Option(help="CLIP tower folder or repo id, when the "
                                                             "checkpoint does not hold it.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Base name of the output files.")] = None,
    threads: Annotated[int, typer.Option(help="Quantizer threads (0: all cores).")] = 0,
) -> None:
    """Convert a HuatuoGPT-Vision checkpoint into NAME-QUANT.gguf + mmproj-NAME-TYPE.gguf."""
    from huatuo_local.convert.pipeline import convert as run_convert

    from .progress import StageProgress

    with StageProgress() as bar:
        result = run_convert(src, out, quant=quant, mmproj_type=mmproj_type, vision_tower=vision_tower,
                             name=name, progress=bar.update, threads=threads)
    typer.echo(f"wrote {result.llm_path}")
    typer.echo(f"wrote {result.mmproj_path}")
    typer.echo(f"wrote {result.manifest_path}")


def main() -> None:
    try:
        app()
    except HuatuoError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
