"""The `huatuo-local` command, the top layer: typer commands that only parse, check and call the layers below.

Each module holds one group of commands and registers them on the shared `app` (cli/app.py) when it is
imported, in the order `--help` lists them. May import every layer below, and the converter's public
entries (`convert.pipeline.convert`, `convert.pull.pull`).
"""

import importlib

from huatuo_local.runtime.cli.app import app, main

for _group in ("store", "chat", "serve", "eval", "tools", "doctor", "cache"):
    importlib.import_module(f"huatuo_local.runtime.cli.{_group}")
app.add_typer(importlib.import_module("huatuo_local.runtime.cli.cache").cache_app, name="cache")

__all__ = ["app", "main"]
