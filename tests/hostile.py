"""Hostile and damaged inputs for every reader: configs, safetensors, shards, .bin, tokenizers,
manifests and GGUFs (images and DICOMs live in test_images.py and test_dicom_bombs.py).

Each generator takes a folder (a copy of a good tiny checkpoint, or an empty scratch folder)
and damages it or writes a file; the tests feed the result to the same entry point a user
hits and require one clear line (or a correct result), never a traceback or a crash.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

# --- safetensors ------------------------------------------------------------------------


def safetensors_bytes(header: object, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def _one(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"w": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


SAFETENSORS = {
    "st-empty": b"",
    "st-short-length": b"\x05\x00\x00",
    "st-length-past-end": safetensors_bytes(_one(), b"\0" * 16, header_len=10**6),
    "st-length-2^63": safetensors_bytes(_one(), b"\0" * 16, header_len=2**63),
    "st-length-zero": safetensors_bytes(b"", b"\0" * 16),
    "st-not-json": safetensors_bytes(b"{not json" + b" " * 8, b"\0" * 16),
    "st-not-utf8": safetensors_bytes(b"\xff\xfe\xfd\xfc", b"\0" * 16),
    "st-header-list": safetensors_bytes([1, 2, 3], b"\0" * 16),
    "st-entry-string": safetensors_bytes({"w": "F32"}, b"\0" * 16),
    "st-unknown-dtype": safetensors_bytes(_one(dtype="F8_E9M9"), b"\0" * 16),
    "st-negative-offset": safetensors_bytes(_one(offsets=(-16, 0)), b"\0" * 16),
    "st-reversed-offsets": safetensors_bytes(_one(offsets=(16, 0)), b"\0" * 16),
    "st-size-mismatch": safetensors_bytes(_one(shape=(3, 3)), b"\0" * 16),
    "st-past-end": safetensors_bytes(_one(shape=(4, 4), offsets=(0, 64)), b"\0" * 16),
    "st-bool-shape": safetensors_bytes(_one(shape=(True, 4), offsets=(0, 16)), b"\0" * 16),
    "st-float-offsets": safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.5]}},
                                          b"\0" * 16),
    "st-overlap": safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                     "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
    "st-metadata-not-text": safetensors_bytes({"__metadata__": {"format": [1]}, **_one()}, b"\0" * 16),
    "st-deep-nesting": safetensors_bytes(b"[" * 100000 + b"]" * 100000, b""),
    "st-huge-shape": safetensors_bytes(_one(shape=(2**40, 2**40), offsets=(0, 16)), b"\0" * 16),
}

# --- torch .bin -------------------------------------------------------------------------


class _Storage:
    def __init__(self, key: str, numel: int, kind: str = "FloatStorage"):
        self.key, self.numel, self.kind = key, numel, kind


class _Tensor:
    def __init__(self, storage: _Storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        import torch._utils

        return (torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict()))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def _torch_pickle(obj) -> bytes:
    import torch

    class P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", getattr(torch, o.kind), o.key, "cpu", o.numel)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj)
    return buf.getvalue()


def torch_zip(obj, storages: dict[str, bytes], compress: bool = False, pkl: bytes | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl if pkl is not None else _torch_pickle(obj))
        z.writestr("archive/version", "3\n")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
    return out.getvalue()


def _bin(offset=0, size=(4,), stride=(1,), numel=4, data=b"\0" * 16, **kw) -> bytes:
    return torch_zip({"w": _Tensor(_Storage("0", numel), offset, size, stride)}, {"0": data}, **kw)


def _zip_without_pickle() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/version", "3\n")
    return out.getvalue()


BIN = {
    "bin-not-zip": b"PK\x03\x04 definitely not a zip",
    "bin-no-pickle": _zip_without_pickle,
    "bin-evil-global": lambda: torch_zip({"w": _Evil()}, {}),
    "bin-negative-stride": lambda: _bin(offset=3, size=(4,), stride=(-1,)),
    "bin-negative-offset": lambda: _bin(offset=-4),
    "bin-offset-past-end": lambda: _bin(offset=100),
    "bin-view-past-storage": lambda: _bin(size=(4, 4), stride=(4, 1)),
    "bin-storage-longer-than-data": lambda: _bin(numel=1000),
    "bin-missing-data-member": lambda: torch_zip({"w": _Tensor(_Storage("7", 4), 0, (4,), (1,))}, {"0": b"\0" * 16}),
    "bin-compressed": lambda: _bin(compress=True),
    "bin-garbage-pickle": lambda: torch_zip(None, {}, pkl=b"\x80\x02\xff\xfe garbage"),
    "bin-not-a-dict": lambda: torch_zip([1, 2, 3], {}),
    "bin-string-shape": lambda: _bin(size=("4",)),
}


# --- whole checkpoints (damage applied to a copy of a good tiny checkpoint) ----------------


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _replace_weights(data: bytes):
    def damage(ckpt: Path) -> None:
        for p in ckpt.glob("*.safetensors"):
            p.unlink()
        (ckpt / "model.safetensors").write_bytes(data)
    return damage


def _bin_checkpoint(make):
    def damage(ckpt: Path) -> None:
        for p in ckpt.glob("*.safetensors"):
            p.unlink()
        (ckpt / "model.safetensors.index.json").unlink(missing_ok=True)
        (ckpt / "pytorch_model.bin").write_bytes(make() if callable(make) else make)
    return damage


def _index(weight_map):
    def damage(ckpt: Path) -> None:
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return damage


CHECKPOINTS = {
    "config-empty": lambda c: (c / "config.json").write_text(""),
    "config-list": lambda c: (c / "config.json").write_text("[1, 2]"),
    "config-deep": lambda c: (c / "config.json").write_text("[" * 100000 + "]" * 100000),
    "config-binary": lambda c: (c / "config.json").write_bytes(np.random.default_rng(1).bytes(512)),
    "config-hidden-string": lambda c: _edit_json(c / "config.json", _set("hidden_size", "64")),
    "config-layers-negative": lambda c: _edit_json(c / "config.json", _set("num_hidden_layers", -2)),
    "config-vocab-huge": lambda c: _edit_json(c / "config.json", _set("vocab_size", 10**12)),
    "config-heads-zero": lambda c: _edit_json(c / "config.json", _set("num_attention_heads", 0)),
    "config-tower-traversal": lambda c: _edit_json(c / "config.json", _set("mm_vision_tower", "../../../etc")),
    "shard-index-traversal": _index({"model.embed_tokens.weight": "../../../etc/passwd"}),
    "shard-index-absolute": _index({"model.embed_tokens.weight": "/etc/passwd"}),
    "shard-index-not-dict": lambda c: (c / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
    "shard-index-garbage": lambda c: (c / "model.safetensors.index.json").write_text("{{{"),
    "tokenizer-json-garbage": lambda c: (c / "tokenizer.json").write_bytes(b"\x00\xff" * 100),
    "tokenizer-json-list": lambda c: (c / "tokenizer.json").write_text("[]"),
    "tokenizer-vocab-types": lambda c: (c / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "vocab": {"a": "zero"}, "merges": [1]}})),
    "tokenizer-config-garbage": lambda c: (c / "tokenizer_config.json").write_text('{"added_tokens_decoder": 5}'),
    "tokenizer-ids-past-vocab": lambda c: (c / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": {"a": 10**9}, "merges": []}, "added_tokens": []})),
    **{f"weights-{k}": _replace_weights(v) for k, v in SAFETENSORS.items()
       if k in ("st-overlap", "st-huge-shape", "st-negative-offset", "st-header-list", "st-length-2^63")},
    **{f"checkpoint-{k}": _bin_checkpoint(v) for k, v in BIN.items()
       if k in ("bin-negative-stride", "bin-view-past-storage", "bin-evil-global")},
}

# --- manifests ----------------------------------------------------------------------------

MANIFESTS = {
    "manifest-not-json": "{",
    "manifest-list": "[]",
    "manifest-missing-fields": json.dumps({"name": "x"}),
    "manifest-unknown-field": None,  # filled from a good manifest by the test
    "manifest-traversal": None,
    "manifest-absolute": None,
    "manifest-eos-string": None,
    "manifest-huge": " " * (2 * 1024 * 1024) + "{}",
}


def damage_manifest(kind: str, good: dict) -> str:
    data = dict(good)
    if kind == "manifest-unknown-field":
        data["run_this"] = "rm -rf /"
    elif kind == "manifest-traversal":
        data["llm_file"] = "../../../etc/passwd"
    elif kind == "manifest-absolute":
        data["mmproj_file"] = "/etc/passwd"
    elif kind == "manifest-eos-string":
        data["eos_id"] = "151643"
    return json.dumps(data)

# --- GGUF ---------------------------------------------------------------------------------


def _s(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def _kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<I", 4) + struct.pack("<I", value)


def gguf_bytes(arch: str = "qwen2", extra_kv: bytes = b"", n_kv: int | None = None, n_tensors: int | None = None,
               tensors: list[tuple[str, tuple[int, ...], int, int]] | None = None, data: bytes | None = None,
               version: int = 3, magic: bytes = b"GGUF") -> bytes:
    kvs = [_kv_str("general.architecture", arch)] + ([extra_kv] if extra_kv else [])
    tensors = tensors if tensors is not None else [("token_embd.weight", (4, 4), 0, 0)]
    infos = b"".join(_s(n) + struct.pack("<I", len(d)) + b"".join(struct.pack("<Q", x) for x in d)
                     + struct.pack("<IQ", t, off) for n, d, t, off in tensors)
    head = magic + struct.pack("<I", version) + struct.pack(
        "<QQ", len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + infos
    body += b"\0" * (-len(body) % 32)
    return body + (data if data is not None else b"\0" * 64)


GGUFS = {
    "gguf-empty": b"",
    "gguf-text": b"this is not a model, it is a clinical note\n" * 4,
    "gguf-wrong-magic": gguf_bytes(magic=b"GGML"),
    "gguf-version-99": gguf_bytes(version=99),
    "gguf-big-endian": gguf_bytes(version=3 << 24),
    "gguf-kv-count-huge": gguf_bytes(n_kv=2**62),
    "gguf-tensor-count-huge": gguf_bytes(n_tensors=2**40),
    "gguf-kv-count-past-end": gguf_bytes(n_kv=3),
    "gguf-string-length-huge": gguf_bytes(extra_kv=_s("general.name") + struct.pack("<I", 8) + _s("x", 2**62)),
    "gguf-array-count-huge": gguf_bytes(extra_kv=_s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**61)),
    "gguf-nested-array": gguf_bytes(extra_kv=_s("x") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 0)),
    "gguf-unknown-value-type": gguf_bytes(extra_kv=_s("x") + struct.pack("<I", 77) + b"\0" * 8),
    "gguf-duplicate-key": gguf_bytes(extra_kv=_kv_str("general.architecture", "llama")),
    "gguf-unknown-tensor-type": gguf_bytes(tensors=[("token_embd.weight", (4, 4), 250, 0)]),
    "gguf-zero-dim": gguf_bytes(tensors=[("token_embd.weight", (0, 4), 0, 0)]),
    "gguf-five-dims": gguf_bytes(tensors=[("token_embd.weight", (1, 1, 1, 1, 4), 0, 0)]),
    "gguf-tensor-past-end": gguf_bytes(tensors=[("token_embd.weight", (4096, 4096), 0, 0)]),
    "gguf-offset-past-end": gguf_bytes(tensors=[("token_embd.weight", (4, 4), 0, 2**40)]),
    "gguf-misaligned": gguf_bytes(tensors=[("token_embd.weight", (4, 4), 0, 3)]),
    "gguf-block-not-whole": gguf_bytes(tensors=[("token_embd.weight", (5, 4), 8, 0)]),  # Q8_0 needs 32
    "gguf-duplicate-tensor": gguf_bytes(tensors=[("a", (4,), 0, 0), ("a", (4,), 0, 32)]),
    "gguf-arch-gpt2": gguf_bytes(arch="gpt2"),
    "gguf-no-arch": gguf_bytes(arch="qwen2", n_kv=0),
    "gguf-valid-header-missing-tensors": gguf_bytes(),  # passes the walk; llama.cpp must refuse it cleanly
    "gguf-alignment-zero": gguf_bytes(extra_kv=_kv_u32("general.alignment", 0)),
    "gguf-truncated-in-header": gguf_bytes()[:40],
}


# --- importance matrices (issue 36) ---------------------------------------------------------


def hostile_matrices(good, write) -> dict[str, object]:
    """Damaged or forged copies of a good ImportanceMatrix (`good`), each written by `write(path, matrix)`:
    name -> matrix. Values llama.cpp's quantizer takes on trust and aborts on or quantizes worse with."""
    import copy

    def changed(change):
        m = copy.deepcopy(good)
        change(m)
        return m

    first = sorted(good.sums)[0]

    def put(name, value):
        def change(m):
            m.sums[first] = np.full_like(m.sums[first], value)
        return name, change

    cases = dict([put("negative-sums", -1.0), put("nan-sums", np.nan), put("inf-sums", np.inf),
                  put("zero-sums", 0.0)])
    cases["negative-count"] = lambda m: m.counts.__setitem__(first, -5)
    cases["zero-count"] = lambda m: m.counts.__setitem__(first, 0)
    cases["count-1e30"] = lambda m: m.counts.__setitem__(first, 10**30)
    cases["200000-datasets"] = lambda m: setattr(m, "datasets", [f"set {i}" for i in range(200_000)])
    return {name: changed(change) for name, change in cases.items()}


def write_matrix_raw(path: Path, matrix) -> None:
    """Like models.imatrix.write_imatrix, but writing whatever the matrix holds (NaN or 1e30 counts too)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "imatrix")
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", list(matrix.datasets) or ["x"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 1)
    for name in sorted(matrix.sums):
        writer.add_tensor(f"{name}.in_sum2", np.asarray(matrix.sums[name], np.float32)[None, :])
        writer.add_tensor(f"{name}.counts", np.array([[float(matrix.counts[name])]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- the user's JSON files: calibration sets and evaluation files (issue 36) ------------------


def hostile_json(folder: Path, image: str) -> dict[str, Path]:
    """Calibration or evaluation files that bypassed the checked reader: name -> path. `image` is a real
    image's path relative to `folder`."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "nested-200000": "[" * 200_000 + "]" * 200_000,
        "lone-surrogate": json.dumps([{"image": image, "question": "q"}]).replace('"q"', '"\\ud800"'),
        "image-a-number": json.dumps([{"image": 5, "question": "q"}]),
        "image-a-list": json.dumps([{"image": [image, image], "question": "q"}]),
        "answer-an-object": json.dumps([{"image": image, "question": "q", "answer": {"a": 1}}]),
        "not-a-list": json.dumps({"image": image}),
        "empty": "",
    }
    out = {}
    for name, text in files.items():
        out[name] = folder / f"{name}.json"
        out[name].write_text(text, encoding="utf-8", errors="surrogatepass")
    big = folder / "huge.json"  # valid JSON, past the readers' size limits (64 MB for evaluation files)
    with open(big, "w") as f:
        f.write('[{"question": "q", "answer": "')
        f.write(" " * (65 * 1024 * 1024))
        f.write('"}]')
    out["huge"] = big
    fifo = folder / "pipe.json"
    os.mkfifo(fifo)
    out["fifo"] = fifo
    return out


# --- RPC workers that lie or stall (issue 36) -----------------------------------------------


class HostileWorker:
    """A stand-in for an RPC worker on 127.0.0.1 that speaks llama.cpp's framing (| cmd | size | data | →
    | size | data |) and then misbehaves as `kind` says:

    - "devices-4294967295", "devices-17": claims that many devices;
    - "garbage": answers HELLO with an answer of the wrong length;
    - "stall": answers the probe's questions honestly (one device, 8 GiB), then never answers again;
    - "unasked": after HELLO, sends bytes nobody asked for (to llama.cpp, not to the probe);
    - "lies-later": answers its first connection (the probe) honestly, then claims 4294967295 devices.
    """

    def __init__(self, kind: str):
        import socket
        import threading

        self.kind = kind
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.endpoint = f"127.0.0.1:{self.port}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        import socket
        import time

        first = self.connections == 1
        def answer(data: bytes) -> None:
            conn.sendall(struct.pack("<Q", len(data)) + data)

        try:
            with conn:
                while True:
                    head = conn.recv(9, socket.MSG_WAITALL)
                    if len(head) < 9:
                        return
                    command, size = struct.unpack("<BQ", head)
                    if size:  # the request itself does not matter to a stand-in
                        conn.recv(size, socket.MSG_WAITALL)
                    if command == 14:  # HELLO
                        if self.kind == "garbage":
                            answer(b"\x07" * 5)
                        else:
                            answer(bytes([7, 0, 0, 0]) + bytes(24))
                            if self.kind == "unasked" and not first:  # llama.cpp's connections, not the probe's
                                conn.sendall(b"\x01" * 64)
                    elif command == 15:  # DEVICE_COUNT
                        lying = self.kind.startswith("devices-") or (self.kind == "lies-later" and first is False)
                        count = {"devices-17": 17}.get(self.kind, 2**32 - 1) if lying else 1
                        answer(struct.pack("<I", count))
                    elif command == 11:  # GET_DEVICE_MEMORY
                        answer(struct.pack("<QQ", 8 << 30, 8 << 30))
                    else:  # everything llama.cpp asks after the probe's questions: never answered
                        time.sleep(3600)
        except OSError:
            return

    def close(self) -> None:
        self.server.close()
