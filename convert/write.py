"""Streaming GGUF writing: metadata first, then each tensor converted and written in turn.

The header comes from gguf's GGUFWriter; the tensor data is written here in row chunks
so that memory stays at one chunk (plus the rare tensor that must be permuted whole),
whatever the model's depth. Files are written under a temporary name and renamed only
when complete.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, LlamaFileType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize
from huatuo_local.models.errors import HuatuoError

from .checkpoint import TensorSource

CHUNK_BYTES = 64 * 1024 * 1024

DIRECT_TYPES = {"F32": QT.F32, "F16": QT.F16, "BF16": QT.BF16, "Q8_0": QT.Q8_0}
FILE_TYPES = {
    QT.F32: LlamaFileType.ALL_F32, QT.F16: LlamaFileType.MOSTLY_F16,
    QT.BF16: LlamaFileType.MOSTLY_BF16, QT.Q8_0: LlamaFileType.MOSTLY_Q8_0,
}


@dataclass
class TensorPlan:
    name: str
    source: TensorSource
    qtype: QT
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape, dtype=np.int64)) // block * size


def pick_type(name: str, shape: tuple[int, ...], wanted: QT) -> QT:
    """1-D tensors and norms stay F32 (llama.cpp's kernels expect it); block types need whole blocks."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return QT.F32
    block, _ = GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return QT.F16 if wanted != QT.F32 else QT.F32
    return wanted


def _encode(raw: np.ndarray, src_dtype: str, qtype: QT) -> np.ndarray:
    if qtype == QT.BF16 and src_dtype == "BF16":
        return np.ascontiguousarray(raw)
    if qtype == QT.F16 and src_dtype == "F16":
        return np.ascontiguousarray(raw)
    if src_dtype == "BF16":
        f32 = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        f32 = raw.astype(np.float32, copy=False)
    if qtype == QT.F32:
        return np.ascontiguousarray(f32, dtype=np.float32)
    if qtype == QT.F16:
        return f32.astype(np.float16)
    return quantize(np.ascontiguousarray(f32), qtype)


def _chunks(plan: TensorPlan) -> Iterator[np.ndarray]:
    raw = plan.source.load()
    if plan.transform is not None:
        raw = plan.transform(raw)
    if raw.ndim < 2:
        yield _encode(raw, plan.source.dtype, plan.qtype)
        return
    row_bytes = max(1, raw[0].nbytes * 4)  # budget for the f32 intermediate
    step = max(1, CHUNK_BYTES // row_bytes)
    release = getattr(plan.source, "release", None) if plan.transform is None else None
    for i in range(0, raw.shape[0], step):
        yield _encode(raw[i:i + step], plan.source.dtype, plan.qtype)
        if release is not None:
            release(i * raw[0].nbytes, min(raw.shape[0], i + step) * raw[0].nbytes)


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename on success, delete on any failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    except OSError as exc:
        raise HuatuoError(
            f"{path.parent}: cannot write here ({exc.strerror}); choose another output folder with -o"
        ) from exc
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise HuatuoError(f"{path}: disk full while writing; free space in {path.parent} and retry") from exc
        raise HuatuoError(f"{path}: write failed ({exc.strerror or exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_gguf(
    path: Path,
    arch: str,
    metadata: Callable[[GGUFWriter], None],
    plans: list[TensorPlan],
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write one GGUF file atomically: `metadata` adds the keys, then the tensors stream in."""
    with atomic_output(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        metadata(writer)
        for p in plans:
            dtype = {QT.F32: np.float32, QT.F16: np.float16}.get(p.qtype, np.float32)
            raw = None if p.qtype in (QT.F32, QT.F16) else p.qtype
            writer.add_tensor_info(p.name, p.shape, np.dtype(dtype), p.nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        fout = writer.fout[0]
        align = writer.data_alignment
        for p in plans:
            fout.write(b"\0" * (-fout.tell() % align))
            written = 0
            for chunk in _chunks(p):
                fout.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
                if on_bytes:
                    on_bytes(chunk.nbytes)
            release = getattr(p.source, "release", None)
            if release is not None:
                release()  # what a permuted (whole-tensor) read touched
            if written != p.nbytes:
                raise HuatuoError(f"{p.name}: wrote {written} bytes, expected {p.nbytes} (converter bug)")
        fout.write(b"\0" * (-fout.tell() % align))
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
