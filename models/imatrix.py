"""llama.cpp's importance-matrix file: what `llama-imatrix` writes and `llama-quantize --imatrix` reads.

A GGUF with `general.type` = `imatrix` and, for each weight matrix NAME that multiplied activations,
`NAME.in_sum2` (F32, one row per matrix, one value per input column: the sum over every input row of
that column's square) and `NAME.counts` (F32: how many input rows were summed). Keys:
`imatrix.datasets` (what the statistics were computed from), `imatrix.chunk_count`,
`imatrix.chunk_size`. llama.cpp's quantizer weighs each column's rounding error by the mean square
(`in_sum2 / counts`), which is what `ImportanceMatrix.means` gives.

The runtime computes a matrix (runtime/quantize/); the converter reads one to quantize with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import gguf_keys as keys
from .errors import HuatuoError
from .gguf_check import check_gguf
from .private import FILE_MODE

SUFFIX = ".imatrix.gguf"
# What a matrix from llama-imatrix or huatuo-local can hold: a few dataset names of modest length (the
# manifest repeats them, and the manifest reader takes 1 MiB at most), and input-row counts far below
# 1e15 (a 34B over a million 4096-token chunks is 4e9).
MAX_DATASETS = 64
MAX_DATASET_CHARS = 512
MAX_COUNT = 1e15
KEY_DATASETS = keys.IMATRIX_DATASETS
KEY_CHUNK_COUNT = keys.IMATRIX_CHUNK_COUNT
KEY_CHUNK_SIZE = keys.IMATRIX_CHUNK_SIZE


@dataclass
class ImportanceMatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> per-column sums of squares
    counts: dict[str, int] = field(default_factory=dict)  # weight name -> input rows summed
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def add(self, name: str, rows: np.ndarray) -> None:
        """Accumulate input rows (n_rows, n_cols) of the matrix `name`."""
        squares = np.square(rows, dtype=np.float64).sum(axis=0)
        if name in self.sums:
            if self.sums[name].shape != squares.shape:
                raise HuatuoError(f"internal: {name} had {self.sums[name].size} columns, now {squares.size}")
            self.sums[name] += squares
        else:
            self.sums[name] = squares
        self.counts[name] = self.counts.get(name, 0) + int(rows.shape[0])

    def means(self) -> dict[str, np.ndarray]:
        """Per-column mean squares, as llama.cpp's quantizer takes them (1 for a matrix never used).

        Computed as `llama-quantize --imatrix` does from the file (float32 sums / float32 count), so
        a quant made here and one made by llama.cpp's tool from the same file are the same bytes."""
        return {n: (s.astype(np.float32) / np.float32(self.counts[n]) if self.counts[n]
                    else np.ones(s.shape, np.float32)) for n, s in self.sums.items()}


def write_imatrix(path: Path, matrix: ImportanceMatrix) -> None:
    """Write `matrix` in llama.cpp's imatrix GGUF format (under a temporary name, then renamed)."""
    from gguf import GGUFWriter

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    # Owner-only from creation: computed from the user's own calibration (--calibration), the sums are
    # statistics of their images and conversations.
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE))
    writer = GGUFWriter(tmp, "imatrix")
    writer.add_string(keys.FILE_KIND, "imatrix")
    writer.add_array(KEY_DATASETS, list(matrix.datasets) or ["huatuo-local"])
    writer.add_uint32(KEY_CHUNK_COUNT, matrix.chunk_count)
    writer.add_uint32(KEY_CHUNK_SIZE, matrix.chunk_size)
    for name in sorted(matrix.sums):  # llama.cpp writes them in name order too
        writer.add_tensor(f"{name}.in_sum2", matrix.sums[name].astype(np.float32)[None, :])
        writer.add_tensor(f"{name}.counts", np.array([[float(matrix.counts[name])]], dtype=np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(path)


def read_imatrix(path: Path) -> ImportanceMatrix:
    """An importance matrix from llama.cpp's GGUF format (checked like any GGUF before it is parsed)."""
    from gguf import GGUFReader

    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO or device would block or stream forever
        raise HuatuoError(f"{path}: not a regular file; give llama.cpp's imatrix GGUF file")
    check_gguf(path, "imatrix")
    reader = GGUFReader(str(path))
    matrix = ImportanceMatrix()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = data
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = data
    for name, s in sums.items():
        c = counts.get(name)
        if c is None or c.size != (s.shape[0] if s.ndim > 1 else 1):
            raise HuatuoError(f"{path}: {name} has sums but no matching counts; not an importance matrix")
        if c.size > 1:
            raise HuatuoError(f"{path}: {name} holds {c.size} expert matrices; HuatuoGPT-Vision has none")
        count = float(c.reshape(-1)[0])
        values = s.reshape(-1).astype(np.float64)
        # llama.cpp's quantizer divides the sums by the count and weighs each column's rounding error by the
        # result: a negative, infinite or absurd value makes it abort (IQ types) or silently quantize worse.
        if not np.isfinite(count) or not 1 <= count <= MAX_COUNT:
            raise HuatuoError(f"{path}: {name} claims {count:g} input rows; an importance matrix counts between 1 "
                              f"and {MAX_COUNT:g} (a damaged or forged file: compute one with --imatrix auto)")
        if not np.isfinite(values).all() or (values < 0).any():
            raise HuatuoError(f"{path}: {name} holds negative or non-finite sums of squares (a damaged or forged "
                              "file: compute one with --imatrix auto)")
        if not values.any():
            raise HuatuoError(f"{path}: {name}'s sums of squares are all zero: the matrix says nothing about "
                              "that weight (compute one with --imatrix auto)")
        matrix.sums[name] = values
        matrix.counts[name] = int(round(count))
    for key, target in ((KEY_CHUNK_COUNT, "chunk_count"), (KEY_CHUNK_SIZE, "chunk_size")):
        field_ = reader.fields.get(key)
        if field_ is not None:
            try:
                setattr(matrix, target, int(field_.parts[field_.data[0]][0]))
            except (TypeError, ValueError, IndexError, OverflowError):
                raise HuatuoError(f"{path}: {key} is not a number; not an importance matrix") from None
    datasets = reader.fields.get(KEY_DATASETS)
    if datasets is not None:
        if len(datasets.data) > MAX_DATASETS:
            raise HuatuoError(f"{path}: names {len(datasets.data)} datasets (at most {MAX_DATASETS}); not a matrix "
                              "from llama-imatrix or huatuo-local")
        # Shown by `info` and kept in the manifest: printable text only (no escape sequences), bounded.
        matrix.datasets = ["".join(ch for ch in bytes(datasets.parts[i]).decode("utf-8", "replace")
                                   if ch.isprintable())[:MAX_DATASET_CHARS] for i in datasets.data]
    if not matrix.sums:
        raise HuatuoError(f"{path}: no importance data in it; compute one with `huatuo-local convert --imatrix auto`")
    return matrix
