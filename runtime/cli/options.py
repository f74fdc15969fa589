"""The command-line options of every command that loads a model, made from `ModelConfig`'s fields.

`@model_options()` adds one option per field (its flag, help and default; a bool field that defaults to
True becomes its negation, `--no-prefix-cache`) to the command's own, and calls the command with
`config=ModelConfig(...)`, checked, instead of the separate values. A command may change a default
(serve answers 4 conversations at once) or leave options out that it has no use for.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.core.config import ModelConfig, flag_of, parse_shares

_TYPES = {"model": str, "n_gpu_layers": int, "threads": int, "ctx": int, "kv_type": str, "parallel": int,
          "rpc": str, "rpc_key_file": Path, "tensor_split": str}


def _parameters(defaults: dict[str, Any], leave_out: set[str]) -> list[inspect.Parameter]:
    params = []
    for f in fields(ModelConfig):
        flag = flag_of(f)
        if flag is None or f.name in leave_out:
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        if isinstance(default, bool):
            # A bool defaulting True is offered as its negation (--no-prefix-cache), False as itself.
            annotation = Annotated[bool, typer.Option(*flag.names, help=flag.help)]
            value = False
        else:
            kind = _TYPES[f.name]
            annotation = Annotated[kind if default is not None else kind | None,
                                   typer.Option(*flag.names, help=flag.help, metavar=flag.metavar)]
            value = default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=annotation))
    return params


def config_from(values: dict[str, Any], defaults: dict[str, Any]) -> ModelConfig:
    """The checked ModelConfig for the command line's values (negated flags turned back)."""
    given: dict[str, Any] = {}
    for f in fields(ModelConfig):
        if f.name not in values:
            if f.name in defaults:
                given[f.name] = defaults[f.name]
            continue
        value = values[f.name]
        if isinstance(f.default, bool) and f.default:
            value = not value  # --no-X given: X is off
        if f.name == "tensor_split" and value is not None:
            value = parse_shares(value)
        given[f.name] = value
    return ModelConfig(**given).check()


def model_options(defaults: dict[str, Any] | None = None, leave_out: tuple[str, ...] = ()):
    """Give a command every load option; it receives them as `config: ModelConfig`."""
    defaults = dict(defaults or {})
    skip = set(leave_out)

    def wrap(command):
        sig = inspect.signature(command, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "config"]
        added = _parameters(defaults, skip)
        names = {p.name for p in added}

        @functools.wraps(command)
        def run(**kwargs: Any):
            values = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
            try:
                config = config_from(values, defaults)
            except HuatuoError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
            return command(config=config, **kwargs)

        run.__signature__ = sig.replace(parameters=[*own, *added])  # what typer reads
        return run

    return wrap
