"""`convert(src, out_dir, quant)`: the one entry point the CLI, the store and the tests call."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from huatuo_local.models.errors import CheckpointError, HuatuoError
from huatuo_local.models.gguf_keys import write_vision_header
from huatuo_local.models.imatrix import ImportanceMatrix, read_imatrix
from huatuo_local.models.interrupt import run_interruptibly, terminate_as_interrupt
from huatuo_local.models.layout import ModelSpec, read_spec
from huatuo_local.models.manifest import MANIFEST_SUFFIX, Manifest, sha256_file
from huatuo_local.models.prompt import CHAT_TEMPLATE
from huatuo_local.models.store import LOSSLESS, is_valid_name, writing_into

from huatuo_local.version import __version__

from . import hub
from .checkpoint import TensorSource, open_tensors
from .names import PROJECTOR_PREFIX, Mapped, clip_name, llm_name, permute_for_rope, projector_name
from .quantize import NEEDS_IMATRIX, QUANT_FTYPES, WANTS_IMATRIX, quantize_gguf, require_imatrix
from .tower import Tower, locate_tower
from .vocab import Vocab, read_vocab
from .write import DIRECT_TYPES, FILE_TYPES, TensorPlan, atomic_output, pick_type, write_gguf

MMPROJ_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0}
QUANT_TYPES = tuple(DIRECT_TYPES) + tuple(QUANT_FTYPES)
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class ConvertResult:
    manifest: Manifest
    manifest_path: Path
    llm_path: Path
    mmproj_path: Path
    lossless: ConvertResult | None = None  # the lossless conversion kept beside it (keep_lossless)


def default_name(src: str, folder: Path) -> str:
    base = src.rstrip("/").split("/")[-1] if hub.looks_like_repo(src) else folder.resolve().name
    return re.sub(r"[^\w.-]+", "-", base).strip("-") or "model"


def _check_shape(ref: TensorSource, mapped: Mapped, where: Path) -> None:
    if tuple(ref.shape) != mapped.shape:
        raise CheckpointError(
            f"{where}: tensor {ref.name} has shape {list(ref.shape)} but config.json implies "
            f"{list(mapped.shape)}; the checkpoint and its config do not match"
        )


def _source_type(tensors: dict[str, TensorSource]) -> QT:
    """A lossless intermediate for llama.cpp's quantizer."""
    dtypes = {r.dtype for r in tensors.values() if len(r.shape) > 1}
    if dtypes <= {"BF16"}:
        return QT.BF16
    if dtypes <= {"F16"}:
        return QT.F16
    return QT.F32


def plan_llm(spec: ModelSpec, tensors: dict[str, TensorSource], target: QT) -> list[TensorPlan]:
    llm = spec.llm
    plans: list[TensorPlan] = []
    for name, ref in tensors.items():
        try:
            mapped = llm_name(name, llm)
        except KeyError:
            raise CheckpointError(
                f"{spec.config_path.parent}: unexpected tensor {name}; is this a LLaVA checkpoint?") from None
        if mapped is None:
            continue
        _check_shape(ref, mapped, spec.config_path.parent)
        transform = None
        if llm.arch == "llama" and mapped.role == "q":
            transform = partial(permute_for_rope, n_head=llm.n_head)
        elif llm.arch == "llama" and mapped.role == "k":
            transform = partial(permute_for_rope, n_head=llm.n_kv_head)
        plans.append(TensorPlan(mapped.gguf_name, ref, pick_type(mapped.gguf_name, mapped.shape, target), transform))
    names = {p.name for p in plans}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(llm.n_layer)
        for t in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                  "ffn_down")
    }
    if not llm.tie_embeddings:
        expected.add("output.weight")
    if llm.qkv_bias:
        expected |= {f"blk.{i}.attn_{t}.bias" for i in range(llm.n_layer) for t in "qkv"}
    missing = sorted(expected - names)
    if missing:
        raise CheckpointError(
            f"{spec.config_path.parent}: {len(missing)} LLM tensors missing (e.g. {missing[0]}); "
            "a shard is probably missing or incomplete, download the checkpoint again"
        )
    order = {"token_embd.weight": -2, "output_norm.weight": 10**9, "output.weight": 10**9 + 1}

    def key(p: TensorPlan) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", p.name)
        return (int(m.group(1)) if m else order.get(p.name, -1), p.name)

    return sorted(plans, key=key)


def plan_mmproj(spec: ModelSpec, tower: Tower, projector: dict[str, TensorSource], target: QT) -> list[TensorPlan]:
    v = tower.spec
    if tower.tensors.get("embeddings.class_embedding") is not None:
        width = tower.tensors["embeddings.class_embedding"].shape[0]
        if width != v.hidden_size:
            raise CheckpointError(
                f"{tower.where}: tower tensors are {width} wide but its config says {v.hidden_size}; "
                "the tower's config does not match its weights (give the right one with --vision-tower)"
            )
    if v.hidden_size != spec.mm_hidden_size:
        raise CheckpointError(
            f"{spec.config_path}: mm_hidden_size {spec.mm_hidden_size} differs from the tower width {v.hidden_size}"
        )
    keep = spec.selected_layers(v.n_layer)
    plans: list[TensorPlan] = []
    for rel, ref in tower.tensors.items():
        try:
            mapped = clip_name(rel, v, keep)
        except KeyError:
            raise CheckpointError(f"{tower.where}: unexpected vision tower tensor {rel}") from None
        if mapped is None:
            continue
        _check_shape(ref, mapped, Path(tower.where))
        name = mapped.gguf_name
        if name == "v.patch_embd.weight":
            qtype = QT.F16 if target == QT.F16 else QT.F32  # the conv kernel takes F16 or F32 only
        elif name == "v.position_embd.weight":
            qtype = QT.F32
        else:
            qtype = pick_type(name, mapped.shape, target)
        plans.append(TensorPlan(name, ref, qtype))
    for name, ref in projector.items():
        try:
            mapped = projector_name(name, spec.llm.hidden_size, spec.mm_hidden_size)
        except KeyError:
            raise CheckpointError(f"{spec.config_path.parent}: unexpected projector tensor {name}") from None
        _check_shape(ref, mapped, spec.config_path.parent)
        plans.append(TensorPlan(mapped.gguf_name, ref, pick_type(mapped.gguf_name, mapped.shape, target)))
    names = {p.name for p in plans}
    expected = {"v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight",
                "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} | {
        f"v.blk.{i}.{t}.{k}" for i in range(keep) for k in ("weight", "bias")
        for t in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")}
    missing = sorted(expected - names)
    if missing:
        raise CheckpointError(f"{tower.where}: vision tensors missing (e.g. {missing[0]}); the tower is incomplete")
    return plans


def mmproj_metadata(spec: ModelSpec, tower: Tower, name: str, target: QT) -> Callable[[GGUFWriter], None]:
    v = tower.spec
    keep = spec.selected_layers(v.n_layer)

    def add(w: GGUFWriter) -> None:
        w.add_type("mmproj")
        w.add_name(name)
        w.add_file_type(FILE_TYPES[target])
        write_vision_header(w, image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                            ffn=v.ffn_size, projection_dim=spec.llm.hidden_size, heads=v.n_head,
                            norm_eps=v.layer_norm_eps, blocks=keep, mean=v.image_mean, std=v.image_std,
                            gelu=v.activation == "gelu")

    return add


def llm_metadata(spec: ModelSpec, vocab: Vocab, name: str, target: QT) -> Callable[[GGUFWriter], None]:
    llm = spec.llm

    def add(w: GGUFWriter) -> None:
        w.add_name(name)
        w.add_file_type(FILE_TYPES[target])
        w.add_context_length(llm.context_length)
        w.add_embedding_length(llm.hidden_size)
        w.add_block_count(llm.n_layer)
        w.add_feed_forward_length(llm.ffn_size)
        w.add_head_count(llm.n_head)
        w.add_head_count_kv(llm.n_kv_head)
        w.add_rope_freq_base(llm.rope_theta)
        w.add_layer_norm_rms_eps(llm.rms_eps)
        w.add_rope_dimension_count(llm.head_dim)
        w.add_tokenizer_model(vocab.model)
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types([int(t) for t in vocab.types])
        if vocab.scores is not None:
            w.add_token_scores(vocab.scores)
        if vocab.merges is not None:
            w.add_token_merges(vocab.merges)
        w.add_bos_token_id(int(vocab.bos_id if vocab.bos_id is not None else vocab.eos_id))
        w.add_eos_token_id(int(vocab.eos_id))
        if vocab.pad_id is not None:
            w.add_pad_token_id(int(vocab.pad_id))
        if vocab.unk_id is not None:
            w.add_unk_token_id(int(vocab.unk_id))
        # The release tokenizes every chunk with add_special_tokens=False: no BOS, ever.
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        if vocab.model == "llama":
            w.add_add_space_prefix(vocab.add_space_prefix)
        w.add_chat_template(CHAT_TEMPLATE)

    return add


class _Bar:
    """Adapts byte counts to the (stage, done, total) progress callback."""

    def __init__(self, progress: Progress | None, stage: str, total: int):
        self.progress, self.stage, self.total, self.done = progress, stage, total, 0
        if progress:
            progress(stage, 0, total)

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.stage, self.done, self.total)


def _commit_shared(stage: Path, final: Path, on_read: Callable[[int], None] | None = None) -> tuple[Path, str]:
    """Move a finished mmproj (or importance matrix) into place without breaking a manifest that uses
    the file there.

    The same checkpoint gives the same bytes, so a second quant reuses the mmproj already
    present; a different one (another checkpoint converted under the same name, a matrix from other
    calibration) gets its own name.
    """
    sha = sha256_file(stage, on_read=on_read)
    if final.is_file():
        if sha256_file(final) == sha:
            return final, sha
        users = []
        for m in final.parent.glob(f"*{MANIFEST_SUFFIX}"):
            try:
                manifest = Manifest.read(m)
            except HuatuoError:
                continue
            users += [manifest.mmproj_file, manifest.imatrix_file]
        if final.name in users:
            final = final.with_name(f"{final.stem}-{sha[:12]}.gguf")
    os.replace(stage, final)
    return final, sha


def _source_folder(src: str, out: Path, revision: str | None, progress: Progress | None) -> tuple[Path, str | None]:
    """The checkpoint folder: the one given, or a Hugging Face repo downloaded first (and its commit)."""
    folder = Path(src).expanduser()
    if not folder.exists():
        if not hub.looks_like_repo(src):
            raise HuatuoError(f"{src}: no such folder; give a checkpoint folder or a Hugging Face repo id")
        return hub.fetch_checkpoint(src, revision, progress, store=out)
    if not folder.is_dir():
        raise HuatuoError(f"{folder}: not a folder; give the checkpoint folder that holds config.json")
    return folder, revision


def _read_checkpoint(folder: Path, vision_tower: str | None):
    """The checkpoint's spec, its LLM and projector tensors (nothing else allowed), tower and vocabulary."""
    spec = read_spec(folder)
    tensors = open_tensors(folder)
    llm_tensors = {n: r for n, r in tensors.items()
                   if n.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."))}
    projector = {n: r for n, r in tensors.items() if n.startswith(PROJECTOR_PREFIX)}
    other = set(tensors) - set(llm_tensors) - set(projector)
    other = {n for n in other if not n.startswith("model.vision_tower.")}
    if other:
        raise CheckpointError(f"{folder}: unexpected tensor {sorted(other)[0]}; is this a LLaVA-style checkpoint?")
    if not projector:
        raise CheckpointError(f"{folder}: no model.mm_projector.* tensors; this is not a multimodal checkpoint")
    tower = locate_tower(folder, spec, tensors, vision_tower)
    vocab = read_vocab(folder, spec.llm.arch, spec.llm.vocab_size, spec.raw)
    return spec, llm_tensors, projector, tower, vocab


# Computes an importance matrix from the lossless LLM GGUF and the mmproj the converter just wrote,
# and saves it in llama.cpp's format at the path given: (llm, mmproj, destination). The converter
# does not run models; huatuo-local's CLI passes runtime.quantize's function (`--imatrix auto`).
MatrixMaker = Callable[[Path, Path, Path], None]


@dataclass
class _Importance:
    """Where a conversion's importance matrix comes from and where it is staged beside the model."""

    given: Path | MatrixMaker
    stage: Path
    matrix: ImportanceMatrix | None = None

    @classmethod
    def staged(cls, given: str | Path | MatrixMaker | None, final: Path) -> _Importance | None:
        if given is None:
            return None
        return cls(given if callable(given) else Path(given).expanduser(), final.with_name(f".{final.name}.staging"))

    def obtain(self, lossless: Path, mmproj: Path) -> ImportanceMatrix:
        if callable(self.given):
            # Up to hours of native work: interruptible (models/interrupt.py)
            run_interruptibly(self.given, lossless, mmproj, self.stage)
        else:
            with atomic_output(self.stage) as tmp:
                shutil.copyfile(self.given, tmp)
        os.chmod(self.stage, 0o600)  # statistics of the calibration conversations: owner-only (SECURITY.md)
        self.matrix = read_imatrix(self.stage)
        return self.matrix


def _write_llm(stage: Path, out: Path, name: str, spec, meta: dict, plans, target, quant: str, threads: int,
               bar, progress: Progress | None, importance: _Importance | None = None,
               mmproj: Path | None = None, keep: Path | None = None) -> None:
    """The LLM GGUF at `stage`: written directly, or written lossless and then quantized by llama.cpp
    (with the importance matrix computed from, or copied beside, that lossless file). With `keep`, the
    lossless file is moved there instead of deleted."""
    if DIRECT_TYPES.get(quant) is not None:
        write_gguf(stage, spec.llm.arch, meta, plans, bar)
        return
    intermediate = out / f".{name}-{target.name}.intermediate.gguf"
    try:
        write_gguf(intermediate, spec.llm.arch, meta, plans, bar)
        _quantize_into(stage, intermediate, quant, threads, progress, importance, mmproj)
        if keep is not None:
            os.replace(intermediate, keep)
    finally:
        intermediate.unlink(missing_ok=True)


def _quantize_into(stage: Path, lossless: Path, quant: str, threads: int, progress: Progress | None,
                   importance: _Importance | None, mmproj: Path | None) -> None:
    means = importance.obtain(lossless, mmproj).means() if importance is not None else None
    with atomic_output(stage) as tmp:
        quantize_gguf(lossless, tmp, quant, threads,
                      (lambda d, t: progress(f"quantize {quant}", d, t)) if progress else None, means)


def check_quant_type(quant: str) -> None:
    """Refuse a type the converter cannot write, in one line."""
    if quant not in QUANT_TYPES:
        raise HuatuoError(f"--quant {quant}: unknown type; choose one of {', '.join(QUANT_TYPES)}")


def _check_options(quant: str, mmproj_type: str, imatrix: str | Path | MatrixMaker | None) -> None:
    """Refuse, before any download: an unknown type, a quant that needs a matrix without one, a matrix
    that would be unused or is not one."""
    check_quant_type(quant)
    if mmproj_type not in MMPROJ_TYPES:
        raise HuatuoError(f"--mmproj-type {mmproj_type}: unknown type; choose f16, q8_0 or f32")
    require_imatrix(quant, imatrix is not None)
    if imatrix is not None and DIRECT_TYPES.get(quant) is not None:
        raise HuatuoError(f"--imatrix: {quant} is written directly, without llama.cpp's quantizer, so a matrix would "
                          "be unused; drop --imatrix or choose a quant such as Q4_K_M or IQ3_XXS")
    if imatrix is not None and not callable(imatrix):
        read_imatrix(Path(imatrix).expanduser())  # a damaged or foreign file: one line now, not after an hour


def convert(
    src: str | Path,
    out_dir: str | Path,
    quant: str = "Q4_K_M",
    mmproj_type: str = "f16",
    vision_tower: str | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    threads: int = 0,
    revision: str | None = None,
    source: str | None = None,
    imatrix: str | Path | MatrixMaker | None = None,
    keep_lossless: bool = False,
) -> ConvertResult:
    """Convert a HuatuoGPT-Vision checkpoint (folder or Hugging Face repo id) into a GGUF pair.

    `imatrix`: llama.cpp's importance-matrix file, or a MatrixMaker that computes one from the lossless
    model (`huatuo-local convert --imatrix auto` computes it from image and text prompts); required by
    the quants in NEEDS_IMATRIX. It is kept beside the model as NAME.imatrix.gguf and named in the manifest.
    `keep_lossless`: also keep the lossless conversion (BF16, F16 or F32, as the checkpoint's weights) as a
    model of its own (`ConvertResult.lossless`), from which `requantize` makes other quants."""
    quant, mmproj_type = quant.upper(), mmproj_type.lower()
    _check_options(quant, mmproj_type, imatrix)
    src_text = str(src)
    folder, revision = _source_folder(src_text, Path(out_dir).expanduser(), revision, progress)
    spec, llm_tensors, projector, tower, vocab = _read_checkpoint(folder, vision_tower)

    name = name or default_name(src_text, folder)
    if not is_valid_name(name):  # it becomes file names: `../x` would write beside the output folder
        raise HuatuoError(f"--name {name}: use letters, digits, '.', '_' and '-' (no folders)")
    out = Path(out_dir).expanduser()
    mm_target = MMPROJ_TYPES[mmproj_type]
    llm_path = out / f"{name}-{quant}.gguf"
    mmproj_path = out / f"mmproj-{name}-{mmproj_type}.gguf"

    direct = DIRECT_TYPES.get(quant)
    lossless_type = _source_type(llm_tensors)
    llm_target = direct if direct is not None else lossless_type
    llm_plans = plan_llm(spec, llm_tensors, llm_target)
    mm_plans = plan_mmproj(spec, tower, projector, mm_target)
    keep = keep_lossless and quant not in LOSSLESS

    # Every file is written under a temporary name and only renamed into place once everything
    # succeeded: a failed or interrupted convert leaves the folder exactly as it was, including
    # files that another quant's manifest points to (the shared mmproj).
    mm_stage = out / f".{mmproj_path.name}.staging"
    llm_stage = out / f".{llm_path.name}.staging"
    lossless_path = out / f"{name}-{lossless_type.name}.gguf"
    lossless_stage = out / f".{lossless_path.name}.staging"
    imatrix_path = out / f"{name}.imatrix.gguf"
    importance = _Importance.staged(imatrix, imatrix_path)
    stages = [mm_stage, llm_stage, lossless_stage, *([importance.stage] if importance is not None else [])]
    source = source or (src_text if not Path(src_text).exists() else str(folder.resolve()))
    with _writing(out):
        try:
            write_gguf(mm_stage, "clip", mmproj_metadata(spec, tower, name, mm_target), mm_plans,
                       _Bar(progress, "vision projector", sum(p.nbytes for p in mm_plans)))
            _write_llm(llm_stage, out, name, spec, llm_metadata(spec, vocab, name, llm_target), llm_plans,
                       llm_target, quant, threads, _Bar(progress, "language model", sum(p.nbytes for p in llm_plans)),
                       progress, importance, mm_stage, lossless_stage if keep else None)
            if keep and not lossless_stage.exists():  # a direct quant (Q8_0) had no lossless intermediate
                plans = plan_llm(spec, llm_tensors, lossless_type)
                write_gguf(lossless_stage, spec.llm.arch, llm_metadata(spec, vocab, name, lossless_type), plans,
                           _Bar(progress, f"language model ({lossless_type.name}, kept)",
                                sum(p.nbytes for p in plans)))
            base = Manifest(
                name=name, llm_file="", mmproj_file="", quant=quant, mmproj_type=mmproj_type, arch=spec.llm.arch,
                source=source, eos_id=int(vocab.eos_id), n_embd=spec.llm.hidden_size, revision=revision or "",
                converter=f"huatuo-local {__version__}",
                extra={"vision_tower": tower.where, "vocab_padded": vocab.padded,
                       "selected_layers": spec.selected_layers(tower.spec.n_layer)})
            return _commit(out, base, llm_stage, llm_path, mm_stage, mmproj_path, importance, imatrix_path,
                           progress, (lossless_stage, lossless_path) if keep else None)
        finally:
            _discard(stages)


def requantize(lossless: Path, quant: str, progress: Progress | None = None, threads: int = 0,
               imatrix: str | Path | MatrixMaker | None = None) -> ConvertResult:
    """Another quant of a converted model, made by llama.cpp's quantizer from its lossless conversion (the
    manifest of a BF16, F16 or F32 pair) and written beside it, sharing its mmproj: no checkpoint needed."""
    quant = quant.upper()
    check_quant_type(quant)
    require_imatrix(quant, imatrix is not None)
    base = Manifest.read(lossless)
    if base.quant.upper() not in LOSSLESS:
        raise HuatuoError(f"{lossless}: a {base.quant} model is not lossless; make {quant} from the checkpoint")
    out = Path(lossless).parent
    source_llm, mmproj_path = out / base.llm_file, out / base.mmproj_file
    llm_path = out / f"{base.name}-{quant}.gguf"
    llm_stage = out / f".{llm_path.name}.staging"
    imatrix_path = out / f"{base.name}.imatrix.gguf"
    importance = _Importance.staged(imatrix, imatrix_path)
    stages = [llm_stage, *([importance.stage] if importance is not None else [])]
    with _writing(out):
        try:
            _quantize_into(llm_stage, source_llm, quant, threads, progress, importance, mmproj_path)
            extra = {k: v for k, v in base.extra.items() if k != "imatrix"}
            made = Manifest(**{**asdict(base), "llm_file": "", "quant": quant, "llm_sha256": "",
                               "converter": f"huatuo-local {__version__} (from {base.llm_file})", "extra": extra})
            return _commit(out, made, llm_stage, llm_path, None, mmproj_path, importance, imatrix_path, progress)
        finally:
            _discard(stages)


def _commit(out: Path, base: Manifest, llm_stage: Path, llm_path: Path, mm_stage: Path | None, mmproj_path: Path,
            importance: _Importance | None, imatrix_path: Path, progress: Progress | None,
            lossless: tuple[Path, Path] | None = None) -> ConvertResult:
    """Checksum what was staged, move it into place (the shared files without breaking another manifest)
    and write the manifests: the model's, and the kept lossless conversion's."""
    hashed = [llm_stage, *([mm_stage] if mm_stage else []), *([importance.stage] if importance else []),
              *([lossless[0]] if lossless else [])]
    bar = _Bar(progress, "checksums", sum(p.stat().st_size for p in hashed))
    llm_sha = sha256_file(llm_stage, on_read=bar)
    if mm_stage is not None:
        mmproj_path, mm_sha = _commit_shared(mm_stage, mmproj_path, bar)
    else:
        mm_sha = base.mmproj_sha256 or sha256_file(mmproj_path)
    extra = dict(base.extra)
    if importance is not None:
        imatrix_path, imatrix_sha = _commit_shared(importance.stage, imatrix_path, bar)
        extra["imatrix"] = {"file": imatrix_path.name, "sha256": imatrix_sha,
                            "datasets": importance.matrix.datasets if importance.matrix else []}
    kept = None
    if lossless is not None:
        stage, final = lossless
        kept_sha = sha256_file(stage, on_read=bar)
        os.replace(stage, final)
        kept_manifest = Manifest(**{**asdict(base), "llm_file": final.name, "mmproj_file": mmproj_path.name,
                                    "quant": final.stem.rsplit("-", 1)[1], "llm_sha256": kept_sha,
                                    "mmproj_sha256": mm_sha, "extra": dict(base.extra)})
        kept_path = out / f"{final.stem}{MANIFEST_SUFFIX}"
        kept_manifest.write(kept_path)
        kept = ConvertResult(kept_manifest, kept_path, final, mmproj_path)
    os.replace(llm_stage, llm_path)
    manifest = Manifest(**{**asdict(base), "llm_file": llm_path.name, "mmproj_file": mmproj_path.name,
                           "llm_sha256": llm_sha, "mmproj_sha256": mm_sha, "extra": extra})
    manifest_path = out / f"{llm_path.stem}{MANIFEST_SUFFIX}"
    manifest.write(manifest_path)
    return ConvertResult(manifest, manifest_path, llm_path, mmproj_path, kept)


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """One convert at a time into `out` (models/store.py), SIGTERM unwinding like Ctrl-C, and a folder this
    convert created removed again when it fails with nothing in it."""
    created = not out.exists()
    try:
        with writing_into(out), terminate_as_interrupt():
            yield
    except BaseException:
        if created:
            try:
                out.rmdir()  # only when empty
            except OSError:
                pass
        raise


def _discard(stages: list[Path]) -> None:
    for p in stages:
        try:
            p.unlink(missing_ok=True)
        except OSError:  # the folder itself could not be created: nothing was staged
            pass


__all__ = ["check_quant_type", "convert", "requantize", "ConvertResult", "MatrixMaker", "QUANT_TYPES", "MMPROJ_TYPES",
           "NEEDS_IMATRIX", "WANTS_IMATRIX"]
