"""Where a model runs, decided once per load from its files, the options and this machine: the one plan.

- No `--n-gpu-layers` and no `--rpc`: every layer on this machine's GPUs when the whole model fits, else the
  first layers that fit (llama/devices.py `plan_offload`, from the GGUF's own tensor sizes); on a GPU build
  that found no GPU, the note says why the CPU runs it.
- `--n-gpu-layers N`: N layers on this machine's GPUs, as given (0: the CPU alone, even beside a GPU).
- `--rpc`: the workers are probed and registered and the layers split over them and this machine
  (rpc/client.py `place_on_workers`).

core/loading.py makes the plan and says its note when a model loads; the engine applies it to llama.cpp and
writes nothing back; doctor shows each installed model's plan. Which quant suits this machine (pull, a bare
model name) is models/sizing.py's, from the same free-memory figures (llama/devices.py `free_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from huatuo_local.models.gguf_check import check_gguf
from huatuo_local.models.sizing import DEFAULT_CTX
from huatuo_local.runtime.llama.devices import Gpu, idle_backends, local_gpus, no_device_note, plan_offload
from huatuo_local.runtime.rpc.client import WorkerPlacement, place_on_workers


@dataclass(frozen=True)
class Plan:
    """Where one load's work goes."""

    n_gpu_layers: int  # llama_model_params.n_gpu_layers: -1 every layer and the output
    gpus: tuple[Gpu, ...]  # this machine's GPUs that take layers; none: its CPU
    vision_on_gpu: bool  # the image encoder on gpus[0]
    note: str  # one line for the user ('' when there is nothing to say)
    workers: WorkerPlacement | None = field(default=None, compare=False)  # with --rpc: the split, kept alive

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpus)


def plan_placement(llm_path: str | Path, mmproj_path: str | Path, *, n_gpu_layers: int | None,
                   mmproj_offload: bool = True, n_ctx_total: int = DEFAULT_CTX, kv_type: str = "f16",
                   rpc: tuple[str, ...] = (), tensor_split: tuple[float, ...] | None = None,
                   rpc_output_local: bool = True, rpc_key_file: str | None = None,
                   gpus: list[Gpu] | None = None) -> Plan:
    """The plan for this model on this machine (see the module). `n_gpu_layers` None: the default placement.
    `gpus`: this machine's GPUs when the caller has just listed them (else they are listed here)."""
    def here() -> list[Gpu]:
        return list(gpus) if gpus is not None else local_gpus()

    if rpc:
        # This machine's share goes to its GPUs unless -ngl 0 keeps it on the CPU.
        mine = here() if n_gpu_layers != 0 else []
        fields = check_gguf(llm_path, "llm").fields
        on = place_on_workers(rpc, tensor_split, rpc_output_local, fields, Path(llm_path).stat().st_size, mine,
                              rpc_key_file)
        return Plan(on.n_gpu_layers, tuple(mine), mmproj_offload and bool(mine), on.note, on)
    if n_gpu_layers is None:
        found = here()
        if not found:  # on a GPU build that found no GPU, the note says so rather than silently using the CPU
            return Plan(0, (), False, no_device_note(idle_backends()))
        default = plan_offload(check_gguf(llm_path, "llm"), check_gguf(mmproj_path, "mmproj"), found,
                               n_ctx_total, kv_type)
        taking = tuple(found) if default.n_gpu_layers != 0 else ()
        return Plan(default.n_gpu_layers, taking, mmproj_offload and default.vision_on_gpu and bool(taking),
                    default.note)
    mine = here() if n_gpu_layers != 0 else []
    return Plan(n_gpu_layers, tuple(mine), mmproj_offload and bool(mine), "")
