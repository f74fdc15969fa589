"""`huatuo-local serve`: the OpenAI-compatible API and the page, on this machine only unless told."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from huatuo_local.models.notice import NOTICE
from huatuo_local.runtime.cli.app import app, fail
from huatuo_local.runtime.cli.options import model_options
from huatuo_local.runtime.core.config import ModelConfig


@app.command(epilog="Examples:\n\n  huatuo-local serve --model huatuo-vision-7b --parallel 4\n\n"
                   "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
                   "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'\n\n"
                   "  huatuo-local serve --host 0.0.0.0 --api-key-file ~/.huatuo-key   (reachable from the network)\n\n"
                   + NOTICE)
@model_options(defaults={"parallel": 4})
def serve(
    config: ModelConfig,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable by others.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(help="Require Authorization: Bearer KEY. Other users of this "
                                                     "machine can read it in the process list: prefer "
                                                     "--api-key-file or HUATUO_LOCAL_API_KEY.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="Read the API keys from a file, one per line; each key "
                                                          "is its own tenant (its clients never share cached "
                                                          "work with another key's).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests allowed to wait for a free sequence; more get 503.")]
    = 64,
    allow_files: Annotated[list[Path] | None, typer.Option(help="A folder whose images may be sent as file:// "
                                                                "URLs (repeat the option).")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(help="Allow browser pages from this origin "
                                                               "(repeat the option; default: none).")] = None,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Log prompt text (off: no patient text in "
                                                                     "logs).")] = False,
    max_body_mb: Annotated[int, typer.Option(help="Largest request body.")] = 64,
    max_image_mb: Annotated[int, typer.Option(help="Largest image in a request.")] = 32,
    max_pixels: Annotated[int | None, typer.Option(help="Largest image accepted, in pixels, the square it is "
                                                        "padded to included (default 50000000).")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
) -> None:
    """Serve the model over an OpenAI-compatible API and a page at / (drop a scan, see what the model sees,
    ask), on this machine only unless --host says otherwise. Research software, not a medical device: answers
    may be wrong."""
    from huatuo_local.runtime.serve.server import serve as run_server
    from huatuo_local.runtime.serve.state import ServeConfig

    keys = _api_keys(api_key, api_key_file)
    from huatuo_local.models.store import resolve

    resolve(config.model)  # a name that resolves to nothing fails now, in one line, not as a server that never works
    if config.rpc:
        from huatuo_local.runtime.serve.supervise import is_child, supervise

        if not is_child():  # llama.cpp aborts the process when a worker dies: keep the server up around it
            raise typer.Exit(supervise(sys.argv[1:], host, port))
    server = ServeConfig(
        model=config, host=host, port=port, api_keys=keys, max_queue=max_queue, allow_files=list(allow_files or []),
        cors_origins=list(cors_origin or []), log_prompts=log_prompts, max_body_bytes=max_body_mb * 1024 * 1024,
        max_image_bytes=max_image_mb * 1024 * 1024, max_pixels=max_pixels)
    run_server(server, open_browser)


def _api_keys(flag: str | None, key_file: Path | None) -> list[str]:
    """The server's API keys: --api-key-file (one per line), else --api-key, else HUATUO_LOCAL_API_KEY."""
    import os

    if flag and key_file:
        fail("give --api-key or --api-key-file, not both")
    if key_file is not None:
        from huatuo_local.models.private import read_secret

        text = read_secret(key_file, "the API keys")
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
