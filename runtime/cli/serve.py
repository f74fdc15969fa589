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
                   "  huatuo-local serve --model huatuo-vision-7b --ray local --replicas 2 --threads 1   (replicas on "
                   "Ray)\n\n"
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
    ray: Annotated[str | None, typer.Option("--ray", metavar="HOST:PORT|local", help="Answer with replicas on a Ray "
                                            "cluster (`ray start --head` on it), or 'local': a private one on this "
                                            "machine. Needs huatuo-local[distributed].", rich_help_panel="Cluster")]
    = None,
    replicas: Annotated[int, typer.Option(help="With --ray: model replicas (one per GPU, else one per machine).",
                                          rich_help_panel="Cluster")] = 1,
    min_replicas: Annotated[int | None, typer.Option(help="With --ray: scale on queue length, down to this many.",
                                                     rich_help_panel="Cluster")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="With --ray: scale on queue length, up to this many "
                                                     "(a machine that joins the cluster gets replicas).",
                                                     rich_help_panel="Cluster")] = None,
    routing: Annotated[str, typer.Option(help="With --ray: 'affinity' (a conversation goes where its images' state "
                                              "is) or 'pow2' (Ray Serve's power of two choices).",
                                         rich_help_panel="Cluster")] = "affinity",
    cache_dir: Annotated[Path | None, typer.Option(help="With --ray: the prefix cache every replica shares; a folder "
                                                        "all machines see makes an image encoded on one usable by all "
                                                        "(default: each machine's own store).",
                                                   rich_help_panel="Cluster")] = None,
    cpus_per_replica: Annotated[float | None, typer.Option(help="With --ray: CPUs Ray reserves per replica "
                                                                 "(default: a whole machine each, or this machine's "
                                                                 "cores shared out with --ray local).",
                                                           rich_help_panel="Cluster")] = None,
) -> None:
    """Serve the model over an OpenAI-compatible API and a page at / (drop a scan, see what the model sees,
    ask), on this machine only unless --host says otherwise. Research software, not a medical device: answers
    may be wrong."""
    from huatuo_local.runtime.serve.server import serve as run_server
    from huatuo_local.runtime.serve.state import ServeConfig

    keys = _api_keys(api_key, api_key_file)
    cluster = _cluster(ray, replicas, min_replicas, max_replicas, routing, cache_dir, cpus_per_replica, config)
    from huatuo_local.models.store import resolve

    if cluster is None or cluster.address == "local":  # on a cluster, the replicas' machines resolve the name
        resolve(config.model)  # a name that resolves to nothing fails now, in one line, not as a server that never
        # works
    if config.rpc:
        from huatuo_local.runtime.serve.supervise import is_child, supervise

        if not is_child():  # llama.cpp aborts the process when a worker dies: keep the server up around it
            raise typer.Exit(supervise(sys.argv[1:], host, port))
    server = ServeConfig(
        model=config, host=host, port=port, api_keys=keys, max_queue=max_queue, allow_files=list(allow_files or []),
        cors_origins=list(cors_origin or []), log_prompts=log_prompts, max_body_bytes=max_body_mb * 1024 * 1024,
        max_image_bytes=max_image_mb * 1024 * 1024, max_pixels=max_pixels, cluster=cluster)
    run_server(server, open_browser)


def _cluster(address, replicas, min_replicas, max_replicas, routing, cache_dir, cpus_per_replica, config):
    """serve --ray's settings, checked before anything starts; None without --ray."""
    from huatuo_local.runtime.cluster.config import ClusterConfig

    given = [name for name, value in (
        ("--replicas", replicas != 1), ("--min-replicas", min_replicas is not None),
        ("--max-replicas", max_replicas is not None), ("--routing", routing != "affinity"),
        ("--cache-dir", cache_dir is not None), ("--cpus-per-replica", cpus_per_replica is not None)) if value]
    if address is None:
        if given:
            fail(f"{given[0]} works with --ray; add --ray local (this machine) or --ray HOST:PORT (a cluster)")
        return None
    if config.rpc:
        fail("--ray and --rpc do not go together: a replica of a cluster holds the whole model")
    if cpus_per_replica is not None and cpus_per_replica <= 0:
        fail(f"--cpus-per-replica must be above 0 (got {cpus_per_replica})")
    try:
        return ClusterConfig(address, replicas, min_replicas, max_replicas, routing,
                             cache_dir.expanduser().resolve() if cache_dir else None, cpus_per_replica).check()
    except ValueError as exc:
        fail(str(exc))


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
