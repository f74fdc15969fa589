"""An answer's record: which model, quant, file checksums, engine build, sampling settings, seed and pictures
produced it, and when. Given by `--json`, REPL transcripts, the page's export, the API (`system_fingerprint` and
`huatuo_record`) and eval runs, so any answer can be traced and redone.

Patient identifiers are never part of it: pictures are named by the path the user gave, a study's series by its
number and a digest of its UID, and no DICOM patient field is ever read (images/study.py).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from huatuo_local.models.notice import NOTICE
from huatuo_local.models.store import ResolvedModel
from huatuo_local.runtime.core.items import ImageItem
from huatuo_local.runtime.core.sampling import SamplingParams

RECORD_VERSION = 1


def software_versions() -> dict:
    """huatuo-local's and llama-cpp-python's versions, as installed."""
    import importlib.metadata

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return {"huatuo_local": version("huatuo-local"), "llama_cpp_python": version("llama-cpp-python")}


def provenance(model: ResolvedModel, identity: dict[str, str], engine_options: dict) -> dict:
    """The model side of every record, fixed when the model is loaded: names, checksums, engine build and how
    the engine was set up (`identity` is loading.cache_identity's)."""
    return {
        "model": model.ref, "quant": model.quant or None, "llm_file": model.llm_path.name,
        "mmproj_file": model.mmproj_path.name, "llm_sha256": identity.get("llm_sha256"),
        "mmproj_sha256": identity.get("mmproj_sha256"),
        "engine": {**software_versions(), "build_sha256": identity.get("engine")},
        "engine_options": engine_options,
    }


def fingerprint(prov: dict) -> str:
    """OpenAI's `system_fingerprint`: changes whenever the model files or the engine build change."""
    text = "|".join(str(prov.get(k)) for k in ("llm_sha256", "mmproj_sha256")) + "|" + str(
        prov.get("engine", {}).get("build_sha256"))
    return "fp_" + hashlib.sha256(text.encode()).hexdigest()[:12]


def sampling_record(params: SamplingParams) -> dict:
    out = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
           "repetition_penalty": params.repetition_penalty, "max_new_tokens": params.max_new_tokens,
           "stop": list(params.stop)}
    if params.presence_penalty or params.frequency_penalty:
        out.update(presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty)
    if params.logit_bias:
        out["logit_bias"] = {str(k): v for k, v in sorted(params.logit_bias)}
    if params.grammar is not None:
        out["constraint"] = {"kind": params.grammar.kind,
                             "grammar_sha256": hashlib.sha256(params.grammar.text.encode()).hexdigest()}
    return out


def image_record(item: ImageItem) -> dict:
    """One picture as the model saw it: its source and the SHA-256 of the exact preprocessed pixels."""
    return {**(item.source or {}), "picture_sha256": item.digest}


def answer_record(prov: dict | None, params: SamplingParams, seed: int | None, turn: int,
                  images: list[ImageItem]) -> dict:
    """The whole record of one answer (turn counts from 1; the seed is the conversation's, so a conversation
    replayed with it gives the same answers)."""
    return {
        "record_version": RECORD_VERSION,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(prov or {}),
        "sampling": sampling_record(params), "seed": seed, "turn": turn,
        "images": [image_record(i) for i in images],
        "notice": NOTICE,
    }
