"""A bounded check of a GGUF file before llama.cpp's parser sees it.

llama.cpp trusts a GGUF's counts, lengths and offsets; so does the `gguf` package's
GGUFReader (an array that claims 2^60 strings makes it loop or allocate without end).
A model file a user names (`--model`, `info`, `verify`, a pulled repo) may be hostile, so
this walks the header with every length checked against what is left of the file, using
the gguf package's own tables of value and tensor types: magic, version, metadata and
tensor counts, each tensor's type, shape, alignment and data range inside the file, and the
architectures huatuo-local supports. Anything wrong is one HuatuoError line.
It reads only the header (metadata and tensor infos), never tensor data.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from . import gguf_keys as keys
from .errors import HuatuoError

SUPPORTED_LLM_ARCHS = ("qwen2", "llama")
MMPROJ_ARCH = "clip"
MAX_KV = 4096
MAX_TENSORS = 65536
MAX_KEY = 65535
MAX_DIMS = 4
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_KEEP_ARRAY = 64  # arrays up to this length are returned; longer ones (vocabularies) are only walked


class GGUFError(HuatuoError):
    pass


@dataclass
class GGUFSummary:
    path: Path
    version: int
    arch: str
    fields: dict = field(default_factory=dict)  # scalars, strings and short arrays
    tensors: dict[str, tuple[int, tuple[int, ...], int, int]] = field(default_factory=dict)  # type, shape, off, n

    @property
    def kind(self) -> str:
        return "mmproj" if self.arch == MMPROJ_ARCH else "llm"


_U64 = struct.Struct("<Q")


class _Walker:
    def __init__(self, path: Path, data: bytes | memoryview, size: int):
        self.path, self.data, self.size, self.pos = path, data, size, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: damaged or hostile GGUF ({what} at byte {self.pos}); "
                         "convert or download the model again")

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise self.fail("unexpected end of file")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return value

    def string(self, limit: int | None = None) -> str:
        n = self.take("<Q")
        if n > self.size - self.pos or (limit is not None and n > limit):
            raise self.fail(f"string of {n} bytes")
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")  # GGUF strings are UTF-8; gguf's own reader refuses anything else
        except UnicodeDecodeError:
            raise self.fail("a key, name or text value that is not UTF-8") from None

    def skip_strings(self, count: int) -> None:
        """`count` strings, each bound checked: the vocabulary's and merges' hundreds of thousands, so the loop
        is kept tight (this walk runs before every model load)."""
        unpack, data, size, pos = _U64.unpack_from, self.data, self.size, self.pos
        try:
            for _ in range(count):
                if pos + 8 > size:
                    self.pos = pos
                    raise self.fail("unexpected end of file")
                n = unpack(data, pos)[0]
                pos += 8
                if n > size - pos:
                    self.pos = pos
                    raise self.fail(f"string of {n} bytes")
                pos += n
        finally:
            self.pos = pos

    def value(self, vtype: int, depth: int = 0):
        try:
            t = GGUFValueType(vtype)
        except ValueError:
            raise self.fail(f"unknown value type {vtype}") from None
        if t in _SCALARS:
            return self.take(_SCALARS[t])
        if t == GGUFValueType.STRING:
            return self.string()
        # An array: element type, count, elements. Nested arrays are refused (llama.cpp has none).
        if depth:
            raise self.fail("nested array")
        etype = self.take("<I")
        count = self.take("<Q")
        try:
            et = GGUFValueType(etype)
        except ValueError:
            raise self.fail(f"unknown array type {etype}") from None
        if et == GGUFValueType.ARRAY:
            raise self.fail("nested array")
        least = struct.calcsize(_SCALARS[et]) if et in _SCALARS else 8
        if count * least > self.size - self.pos:
            raise self.fail(f"array of {count} items")
        if count > _KEEP_ARRAY:
            if et in _SCALARS:
                self.pos += count * least
            else:
                self.skip_strings(count)
            return None
        return [self.value(etype, depth + 1) for _ in range(count)]


def check_gguf(path: str | Path, expect: str | None = None) -> GGUFSummary:
    """Walk a GGUF's header with every bound checked; `expect` is "llm", "mmproj", "imatrix" or None."""
    import mmap

    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # opening a FIFO blocks until a writer comes: refuse before that
            raise GGUFError(f"{path}: not a regular file; a model is a .gguf file")
        size = info.st_size
        f = open(path, "rb")
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    with f:
        if size < 24:
            raise GGUFError(f"{path}: not a GGUF file (only {size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _walk(path, view, size, expect)
            finally:
                view.release()


def _architecture(path: Path, fields: dict, expect: str | None) -> str:
    """The file's architecture, refused unless it is what the caller expects."""
    arch = fields.get(keys.ARCHITECTURE)
    if expect == "imatrix":  # llama.cpp's importance matrix: no architecture, but its own type
        if fields.get(keys.FILE_KIND) != "imatrix":
            raise GGUFError(f"{path}: not an importance matrix (general.type is not imatrix)")
        return "imatrix"
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: GGUF without general.architecture; not a model huatuo-local can run")
    allowed = {"llm": SUPPORTED_LLM_ARCHS, "mmproj": (MMPROJ_ARCH,)}.get(expect or "", (*SUPPORTED_LLM_ARCHS,
                                                                                         MMPROJ_ARCH))
    if arch not in allowed:
        want = "a vision projector (mmproj, arch clip)" if expect == "mmproj" else \
            f"a {' or '.join(SUPPORTED_LLM_ARCHS)} language model"
        raise GGUFError(f"{path}: architecture {arch!r} is not {want}; give a HuatuoGPT-Vision GGUF pair")
    return arch


def _walk(path: Path, data: memoryview, size: int, expect: str | None) -> GGUFSummary:
    w = _Walker(path, data, size)
    if bytes(data[:4]) != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file; give a model converted with `huatuo-local convert`")
    w.pos = 4
    version = w.take("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors, n_kv = w.take("<Q"), w.take("<Q")
    if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
        raise w.fail(f"{n_kv} metadata entries and {n_tensors} tensors")
    fields: dict = {}
    for _ in range(n_kv):
        key = w.string(MAX_KEY)
        if key in fields:
            raise w.fail(f"duplicate key {key!r}")
        fields[key] = w.value(w.take("<I"))
    arch = _architecture(path, fields, expect)
    alignment = fields.get(keys.ALIGNMENT, 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise w.fail(f"alignment {alignment!r}")
    infos = []
    for _ in range(n_tensors):
        name = w.string(MAX_KEY)
        n_dims = w.take("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"tensor {name!r} with {n_dims} dimensions")
        shape = tuple(w.take("<Q") for _ in range(n_dims))
        ttype, offset = w.take("<I"), w.take("<Q")
        infos.append((name, shape, ttype, offset))
    data_start = -(-w.pos // alignment) * alignment
    tensors: dict[str, tuple[int, tuple[int, ...], int, int]] = {}
    for name, shape, ttype, offset in infos:
        if name in tensors:
            raise w.fail(f"tensor {name!r} twice")
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise w.fail(f"tensor {name!r} of unknown type {ttype}") from None
        if any(d <= 0 or d > 1 << 40 for d in shape) or shape[0] % block:
            raise w.fail(f"tensor {name!r} with shape {list(shape)}")
        count = 1
        for d in shape:
            count *= d
        nbytes = count // block * type_size
        if offset % alignment or data_start + offset + nbytes > size:
            raise GGUFError(f"{path}: tensor {name!r} lies outside the file (truncated or damaged); "
                            "convert or download the model again")
        tensors[name] = (ttype, shape, offset, nbytes)
    return GGUFSummary(path, version, arch, fields, tensors)


def read_fields(path: str | Path, keys: tuple[str, ...], expect: str | None = None) -> dict:
    """A few metadata values of a checked GGUF file (no tensor data is read)."""
    summary = check_gguf(path, expect)
    return {k: summary.fields[k] for k in keys if k in summary.fields}
