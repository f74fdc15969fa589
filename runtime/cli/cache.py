"""`huatuo-local cache info|clear`: the on-disk prefix cache."""

from __future__ import annotations

import typer

cache_app = typer.Typer(help="Show or clear the on-disk prefix cache (encoded images, derived from your scans).",
                        no_args_is_help=True, rich_markup_mode=None)

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
