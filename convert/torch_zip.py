"""Torch-free reading of PyTorch `.bin` checkpoints (the zip format of torch >= 1.6).

Older LLaVA-style releases and some CLIP tower folders ship `pytorch_model*.bin`.
The pickle inside is read with a restricted unpickler that only knows how to rebuild
tensors: storages become memory-mapped views of the zip's (uncompressed) members, and
no code from the file is ever executed.
"""

from __future__ import annotations

import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huatuo_local.models.errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": ("F32", np.dtype("<f4")),
    "HalfStorage": ("F16", np.dtype("<f2")),
    "BFloat16Storage": ("BF16", np.dtype("<u2")),
    "DoubleStorage": ("F64", np.dtype("<f8")),
    "LongStorage": ("I64", np.dtype("<i8")),
    "IntStorage": ("I32", np.dtype("<i4")),
    "ShortStorage": ("I16", np.dtype("<i2")),
    "CharStorage": ("I8", np.dtype("i1")),
    "ByteStorage": ("U8", np.dtype("u1")),
    "BoolStorage": ("BOOL", np.dtype("?")),
}


_MAX_PICKLE = 256 * 1024 * 1024  # the pickle only names tensors; the 34B's is a few hundred KB


@dataclass(frozen=True)
class _Storage:
    kind: str
    dtype: np.dtype
    offset: int  # absolute byte offset of the storage in the .bin file
    numel: int


@dataclass(frozen=True)
class TorchTensorRef:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: TorchZipFile
    storage: _Storage
    storage_offset: int
    stride: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.storage.dtype.itemsize

    def load(self) -> np.ndarray:
        base = self.file.storage_array(self.storage)
        item = self.storage.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            base[self.storage_offset:], shape=self.shape, strides=tuple(s * item for s in self.stride),
            writeable=False,
        )

    def load_f32(self) -> np.ndarray:
        raw = self.load()
        if self.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)


class _Unpickler(pickle.Unpickler):
    def __init__(self, fp, owner: TorchZipFile):
        super().__init__(fp)
        self.owner = owner

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise CheckpointError(
            f"{self.owner.path}: refuses to load {module}.{name} from a pickle; convert the file to safetensors"
        )

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self.owner.path}: unexpected pickle record; convert the file to safetensors")
        if len(pid) != 5 or not isinstance(pid[4], int) or isinstance(pid[4], bool) or pid[4] < 0:
            raise CheckpointError(f"{self.owner.path}: malformed storage record; the checkpoint is corrupt")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(kind, str) or kind not in _STORAGE_DTYPES:
            raise CheckpointError(f"{self.owner.path}: unsupported storage type {kind}")
        return self.owner.storage(kind, key, numel)


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return ("tensor", storage, storage_offset, size, stride)


def _ints(value, what: str, path: Path) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 8 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{path}: tensor {what} is not a list of integers; the checkpoint is corrupt")
    return tuple(value)


def _check_view(path: Path, name: str, storage: _Storage, offset, shape, stride) -> TorchTensorRef:
    """A tensor's view must lie inside its storage: no negative strides, no read past the end."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"{path}: tensor {name} has no storage; the checkpoint is corrupt")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise CheckpointError(f"{path}: tensor {name} has a negative or invalid storage offset")
    shape, stride = _ints(shape, f"{name} shape", path), _ints(stride, f"{name} stride", path)
    if len(shape) != len(stride) or any(d < 0 for d in shape) or any(s < 0 for s in stride):
        raise CheckpointError(f"{path}: tensor {name} has a negative size or stride; the checkpoint is corrupt")
    if all(d > 0 for d in shape):
        last = offset + sum((d - 1) * s for d, s in zip(shape, stride))
        if last >= storage.numel:
            raise CheckpointError(f"{path}: tensor {name} reads past the end of its storage; the checkpoint is corrupt")
    elif offset > storage.numel:
        raise CheckpointError(f"{path}: tensor {name} starts past the end of its storage")
    return TorchTensorRef(name, storage.kind, shape, None, storage, offset, stride)  # type: ignore[arg-type]


class TorchZipFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        try:
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{self.path}: missing; download the checkpoint again") from exc
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise CheckpointError(
                f"{self.path}: not a readable PyTorch zip checkpoint (truncated, or the legacy pre-1.6 format); "
                "download it again or convert it to safetensors"
            ) from exc
        names = self._zip.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise CheckpointError(f"{self.path}: no data.pkl inside; not a PyTorch checkpoint")
        self._prefix = pkl[0][: -len("data.pkl")]
        if self._zip.getinfo(pkl[0]).file_size > _MAX_PICKLE:
            raise CheckpointError(f"{self.path}: its data.pkl claims {self._zip.getinfo(pkl[0]).file_size} bytes; "
                                  "not a model checkpoint's index of tensors")
        try:
            with self._zip.open(pkl[0]) as fp:
                obj = _Unpickler(fp, self).load()
        except CheckpointError:
            raise
        except Exception as exc:  # a corrupt pickle or zip member can raise almost anything
            raise CheckpointError(f"{self.path}: corrupt checkpoint ({type(exc).__name__}); download it again") \
                from exc
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: the pickle holds no state dict; not a model checkpoint")
        self.tensors: dict[str, TorchTensorRef] = {}
        for name, value in obj.items():
            if isinstance(value, tuple) and value and value[0] == "tensor" and len(value) == 5:
                if not isinstance(name, str):
                    raise CheckpointError(f"{self.path}: a tensor name is not text; the checkpoint is corrupt")
                _, storage, off, size, stride = value
                ref = _check_view(self.path, name, storage, off, size, stride)
                self.tensors[name] = TorchTensorRef(name, ref.dtype, ref.shape, self, storage, ref.storage_offset,
                                                    ref.stride)

    def storage(self, kind: str, key: str, numel: int) -> _Storage:
        try:
            info = self._zip.getinfo(f"{self._prefix}data/{key}")
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor data {key} is missing from the archive; download it again") \
                from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: compressed tensor data; convert the file to safetensors")
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: corrupt zip entry; download it again")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name_len + extra_len
        label, dtype = _STORAGE_DTYPES[kind]
        if offset + numel * dtype.itemsize > self.path.stat().st_size or numel * dtype.itemsize > info.file_size:
            raise CheckpointError(f"{self.path}: truncated (storage {key} is shorter than it says); download it again")
        return _Storage(label, dtype, offset, numel)

    def storage_array(self, storage: _Storage) -> np.ndarray:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(self._mmap, dtype=storage.dtype, count=storage.numel, offset=storage.offset)
