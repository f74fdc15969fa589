"""`huatuo-local pull`: fetch a model into the local store, ready to chat.

A known name or a Hugging Face repo holding the original checkpoint is downloaded (only
the needed files, resumable), converted and quantized; a repo that already holds a
converted GGUF pair is downloaded as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.manifest import MANIFEST_SUFFIX, Manifest, sha256_file
from huatuo_local.models.registry import KNOWN_MODELS
from huatuo_local.models.store import ResolvedModel, models_dir, resolve

from .engine import read_gguf_fields


def _repo_files(repo_id: str) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return HfApi().list_repo_files(repo_id)
    except RepositoryNotFoundError as exc:
        raise HuatuoError(f"{repo_id}: no such Hugging Face repository (or it is private)") from exc
    except Exception as exc:  # HTTP errors, OS errors and httpx's own, which share no narrower base
        raise HuatuoError(
            f"{repo_id}: cannot reach Hugging Face ({type(exc).__name__}); on an offline machine copy the "
            "checkpoint over and run: huatuo-local convert FOLDER -o OUT"
        ) from exc


def _pick_gguf_pair(files: list[str], quant: str) -> tuple[str, str]:
    ggufs = [f for f in files if f.endswith(".gguf")]
    projectors = [f for f in ggufs if Path(f).name.lower().startswith("mmproj")]
    llms = [f for f in ggufs if f not in projectors]
    wanted = [f for f in llms if quant.lower() in Path(f).name.lower()]
    if not projectors or not llms:
        raise HuatuoError("the repository has GGUF files but not an LLM and an mmproj pair")
    if not wanted:
        raise HuatuoError(f"no {quant} GGUF in the repository; available: {', '.join(Path(f).name for f in llms)}")
    return wanted[0], sorted(projectors, key=lambda f: ("f16" not in f.lower(), f))[0]


def pull(model: str, quant: str | None = None, name: str | None = None, progress=None) -> ResolvedModel:
    from huatuo_local.convert import hub
    from huatuo_local.convert.pipeline import convert

    known = KNOWN_MODELS.get(model)
    repo_id = known.repo_id if known else model
    if not hub.REPO_ID.match(repo_id):
        raise HuatuoError(f"{model}: not a known model ({', '.join(KNOWN_MODELS)}) nor a Hugging Face repo id")
    quant = (quant or (known.default_quant if known else "Q4_K_M")).upper()
    name = name or (known.name if known else re.sub(r"[^\w.-]+", "-", repo_id.split("/")[-1]))
    folder = models_dir() / name
    files = _repo_files(repo_id)
    if any(f.endswith(".gguf") for f in files):
        llm_file, mm_file = _pick_gguf_pair(files, quant)
        local = hub.download(repo_id, [llm_file, mm_file])
        folder.mkdir(parents=True, exist_ok=True)
        llm, mm = folder / Path(llm_file).name, folder / Path(mm_file).name
        for src, dst in ((local / llm_file, llm), (local / mm_file, mm)):
            if not dst.exists():
                dst.symlink_to(src.resolve())
        arch = read_gguf_fields(llm, ("general.architecture",))["general.architecture"]
        meta = read_gguf_fields(llm, ("tokenizer.ggml.eos_token_id", f"{arch}.embedding_length"))
        manifest = Manifest(name=name, llm_file=llm.name, mmproj_file=mm.name, quant=quant, mmproj_type="",
                            arch=arch, source=repo_id, eos_id=int(meta["tokenizer.ggml.eos_token_id"]),
                            n_embd=int(meta[f"{arch}.embedding_length"]), llm_sha256=sha256_file(llm),
                            mmproj_sha256=sha256_file(mm), converter="downloaded")
        manifest.write(folder / f"{llm.stem}{MANIFEST_SUFFIX}")
        return resolve(str(folder))
    result = convert(repo_id, folder, quant=quant, name=name, progress=progress)
    return resolve(str(result.manifest_path))
