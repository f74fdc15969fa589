"""`ModelConfig`: every option that decides how a model is loaded, once (the role vLLM's EngineArgs plays).

Each field carries its command-line flag, help and bounds; `runtime/cli/options.py` makes the options of
every command that loads a model from them (chat, serve, eval, verify), and the Python API, the server and
eval take the same object, so an option cannot exist on one front-end and not another, and the same
options give the same engine whichever front-end loads it (tests/test_config.py). `core/loading.py`
`open_model(config)` is the one way a model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from huatuo_local.models.errors import HuatuoError

KV_TYPES = ("f16", "f32", "q8_0")


@dataclass(frozen=True)
class Flag:
    """How a field is given on the command line."""

    names: tuple[str, ...]  # e.g. ("-ngl", "--n-gpu-layers"); a bool field defaulting True: its negation
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None


def _option(default: Any, *names: str, help: str, low: float | None = None, high: float | None = None,
            choices: tuple[str, ...] = (), metavar: str | None = None) -> Any:
    return field(default=default, metadata={"flag": Flag(names, help, low, high, choices, metavar)})


def flag_of(f) -> Flag | None:
    return f.metadata.get("flag")


@dataclass(frozen=True)
class ModelConfig:
    """How a model is loaded: which one, where its layers go, its context, cache and workers."""

    model: str | None = _option(None, "--model", "-m", help="Model name, folder, manifest or .gguf file (default: "
                                "huatuo-vision-7b; a name with several quants: the best installed that fits).")
    n_gpu_layers: int | None = _option(None, "-ngl", "--n-gpu-layers", help="Layers to offload (default: all when a "
                                       "GPU is available; 0: the CPU only, also with --rpc).", low=-1, high=100000)
    threads: int | None = _option(None, "--threads", help="CPU threads (default: the physical cores).", low=1,
                                  high=1024)
    ctx: int | None = _option(None, "--ctx", help="Context per conversation in tokens (default: 8192, room for the "
                              "release's 6 images and a 512-token answer).", low=64, high=1 << 20)
    kv_type: str = _option("f16", "--kv-type", help="KV cache type: f16, f32 or q8_0.", choices=KV_TYPES)
    parallel: int = _option(1, "--parallel", help="Conversations (questions) answered at once: llama.cpp "
                            "sequences, each with its own context.", low=1, high=64)
    mmproj_offload: bool = _option(True, "--no-mmproj-offload", help="Keep the vision encoder on the CPU.")
    prefix_cache: bool = _option(True, "--no-prefix-cache", help="Do not keep encoded images on disk for the next "
                                 "run.")
    allow_unverified_vision: bool = _option(False, "--allow-unverified-vision", help="Answer even if the vision "
                                            "probe fails.")
    rpc: str | None = _option(None, "--rpc", metavar="HOST:PORT[,...]", help="llama.cpp RPC workers that hold some "
                              "layers (huatuo-local rpc-worker on each); this machine's share and the vision encoder "
                              "stay here, on its GPU when it has one.")
    rpc_key_file: Path | None = _option(None, "--rpc-key-file", metavar="FILE", help="With --rpc: the key the "
                                        "workers were started with (rpc-worker --key-file): TLS, and only they are "
                                        "reached.")
    tensor_split: tuple[float, ...] | None = _option(None, "--tensor-split", metavar="LOCAL,W1,...", help="With "
                                                     "--rpc: shares of the layers, this machine first, then each "
                                                     "worker (e.g. 1,1,1; default: by free memory).")
    # The Python API's alone (no flag): benchmarks pick the load mode; tools that must reach the network.
    load: str | None = None
    offline: bool = True

    def check(self) -> ModelConfig:
        """The same config, every value in range; one line naming the flag otherwise."""
        for f in fields(self):
            flag, value = flag_of(f), getattr(self, f.name)
            if flag is None or value is None or isinstance(value, (bool, Path, tuple)):
                continue
            name = flag.names[-1]
            if flag.choices and value not in flag.choices:
                raise HuatuoError(f"{name} {value}: choose {', '.join(flag.choices[:-1])} or {flag.choices[-1]}")
            if isinstance(value, int) and ((flag.low is not None and value < flag.low)
                                           or (flag.high is not None and value > flag.high)):
                raise HuatuoError(f"{name} {value}: give {_number(flag.low)} to {_number(flag.high)}")
        if self.tensor_split is not None and not self.rpc:
            raise HuatuoError("--tensor-split needs --rpc")
        if self.rpc_key_file is not None and not self.rpc:
            raise HuatuoError("--rpc-key-file needs --rpc")
        if self.rpc:
            from huatuo_local.runtime.rpc.client import parse_endpoints

            parse_endpoints(self.rpc)
        return self

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


def parse_shares(text: str) -> tuple[float, ...]:
    """--tensor-split's numbers (this machine first, then each --rpc worker)."""
    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise HuatuoError(f"--tensor-split {text}: give numbers separated by commas, this machine's share first "
                          "(e.g. 1,1,1)") from None
    return shares


LOAD_FIELDS = tuple(f.name for f in fields(ModelConfig))


def _number(x: float) -> str:
    """A bound as the user types it: 1048576, not 1.04858e+06."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
