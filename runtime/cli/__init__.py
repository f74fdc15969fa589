"""The `huatuo-local` command (the top layer): typer commands that only parse, check and call the layers below."""

from huatuo_local.runtime.cli.commands import app, main

__all__ = ["app", "main"]
