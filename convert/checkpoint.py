"""A checkpoint folder's tensors, whatever files hold them.

Handles one `model.safetensors`, shards listed by `model.safetensors.index.json`, and the
older `pytorch_model*.bin` variants (through the torch-free zip reader). Tensors are
references; nothing is read until the converter asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from huatuo_local.models.errors import CheckpointError
from huatuo_local.models.jsonfile import read_json
from huatuo_local.models.manifest import is_plain_file_name

from .safetensors import SafetensorsFile
from .torch_zip import TorchZipFile


class TensorSource(Protocol):
    name: str
    dtype: str
    shape: tuple[int, ...]

    def load(self) -> np.ndarray: ...
    def load_f32(self) -> np.ndarray: ...


def _read_index(index: Path) -> list[Path]:
    weight_map = read_json(index, expect=dict).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: unreadable shard index (no weight_map); download it again")
    for f in set(weight_map.values()):
        # Shards live beside their index: `../x` or an absolute path would read any file on the machine.
        if not is_plain_file_name(f):
            raise CheckpointError(f"{index}: shard name {f!r} is not a file in the checkpoint folder; "
                                  "the index is corrupt or hostile")
    files = sorted({index.parent / f for f in weight_map.values()})
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed in {index.name} is missing; download the checkpoint again")
    return files


def weight_files(folder: Path) -> list[Path]:
    """The files holding a folder's weights, preferring safetensors."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            return _read_index(index)
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(
        f"{folder}: no weights found (model.safetensors, shards with an index, or pytorch_model*.bin)"
    )


def open_tensors(folder: Path) -> dict[str, TensorSource]:
    """Every tensor of a checkpoint folder by name, lazily."""
    tensors: dict[str, TensorSource] = {}
    for path in weight_files(folder):
        reader = SafetensorsFile(path) if path.suffix == ".safetensors" else TorchZipFile(path)
        for name, ref in reader.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name} appears in two files; the checkpoint is inconsistent")
            tensors[name] = ref
    return tensors
