"""`HuatuoChatbot`: a drop-in for the release's Python class, backed by llama.cpp (a front-end, layer 5).

    from huatuo_local import HuatuoChatbot
    bot = HuatuoChatbot("huatuo-vision-7b")
    output = bot.inference("What does the picture show?", ["scan.png"])
    print(output[0])
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from huatuo_local.models import defaults
from huatuo_local.runtime.core.config import LOAD_FIELDS, ModelConfig
from huatuo_local.runtime.core.loading import open_model
from huatuo_local.runtime.core.sampling import SamplingParams
from huatuo_local.runtime.core.session import Counters, Reply, Session
from huatuo_local.runtime.core.structured import Grammar
from huatuo_local.runtime.images.dicom import parse_window
from huatuo_local.runtime.images.loader import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    LoadOptions,
    expand_inputs,
    load_input,
)
from huatuo_local.runtime.images.study import parse_montage


def grammar_for(schema: dict | type | None) -> Grammar | None:
    """A JSON Schema (dict) or a pydantic model class as the constraint on an answer; SchemaError (one line)
    when it cannot be enforced."""
    if schema is None:
        return None
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # pydantic v2
        # The model's fields and nothing else, as OpenAI's client asks for a pydantic model (strict): an
        # object open to extra properties would let the answer run on in keys of its own.
        schema = _closed(schema.model_json_schema())
    return Grammar.json_schema(schema)


def _closed(node):
    """The schema with `additionalProperties: false` on every object that lists its properties and says
    nothing about others."""
    if isinstance(node, dict):
        out = {k: _closed(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


# The Python API's earlier names for load options (kept: scripts written against them still work).
_RENAMED = {"n_ctx": "ctx", "n_seq": "parallel"}


class HuatuoChatbot:
    """A loaded model and one conversation. `inference` is single-turn, `chat` keeps history.

    The model and how it is loaded: a name (or folder, manifest, .gguf) and any of ModelConfig's options as
    keywords (`HuatuoChatbot("huatuo-vision-7b", n_gpu_layers=0, ctx=4096)`), or a whole `ModelConfig`
    (`HuatuoChatbot(config=...)`, what the command line builds). The rest are the conversation's: sampling
    (the release's defaults), the image window and frame, the stop strings, and `schema`: every answer a JSON
    document valid against it (a JSON Schema as a dict, or a pydantic model class), enforced while sampling.

    An image may be a DICOM study (a folder, zip or DICOMDIR): `series` (number or UID), `slices` ("auto",
    "auto:4", "40:80:10", "12,30") and `montage` ("3x3") choose what the model sees of it. Every answer's
    `last_reply.record` says which model, settings and pictures produced it. Research software, not a medical
    device: answers may be wrong."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        config: ModelConfig | None = None,
        temperature: float = defaults.TEMPERATURE,
        repetition_penalty: float = defaults.REPETITION_PENALTY,
        max_new_tokens: int = defaults.MAX_NEW_TOKENS,
        top_k: int = defaults.TOP_K,
        top_p: float = defaults.TOP_P,
        seed: int | None = None,
        stop: list[str] | None = None,
        schema: dict | type | None = None,
        window: str | None = None,
        frame: int | None = None,
        max_pixels: int | None = None,
        series: str | int | None = None,
        slices: str | None = None,
        montage: str | None = None,
        prefetch_images: list[ImageInput] | None = None,
        **load: object,
    ):
        unknown = sorted(set(load) - set(LOAD_FIELDS) - set(_RENAMED))
        if unknown:
            raise TypeError(f"HuatuoChatbot got unexpected options {unknown}; the load options are {LOAD_FIELDS}")
        load = {_RENAMED.get(k, k): v for k, v in load.items()}
        if isinstance(load.get("tensor_split"), list):
            load["tensor_split"] = tuple(load["tensor_split"])
        if isinstance(load.get("rpc"), (list, tuple)):
            load["rpc"] = ",".join(load["rpc"])
        config = (config or ModelConfig()).with_(**({"model": str(model)} if model is not None else {}), **load)
        self.sampling = SamplingParams(temperature=temperature, repetition_penalty=repetition_penalty,
                                       max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p, seed=seed,
                                       stop=tuple(stop or ()), grammar=grammar_for(schema)).check()
        images = LoadOptions(parse_window(window), frame, max_pixels or DEFAULT_MAX_PIXELS,
                             None if series is None else str(series), slices, parse_montage(montage))
        # The first question's images, if given, are encoded while the LLM loads (the answer is the same).
        pictures = tuple(load_input(p, images) for p in expand_inputs(list(prefetch_images or []), images))
        loaded = open_model(config, prefetch=pictures)
        self.config, self.model, self.engine, self.load_note = config, loaded.model, loaded.engine, loaded.note
        self.session = Session(self.engine, self.sampling, images, loaded.cache, provenance=loaded.provenance)

    # --- the release's interface ----------------------------------------------------

    def inference(self, query: str, image_paths: list[ImageInput] | None = None,
                  schema: dict | type | None = None) -> list[str]:
        """One question, no history (the release's `inference`); returns [answer]. With `schema` (a JSON Schema
        or a pydantic model class) the answer is a JSON document valid against it."""
        self.session.clear()
        reply = self.session.ask(query, list(image_paths or []), self._params(schema))
        self.session.clear()
        return [reply.text]

    def chat(self, text: str, images: list[ImageInput] | None = None, schema: dict | type | None = None) -> str:
        """One turn of a conversation; earlier turns and images stay in context."""
        return self.session.ask(text, list(images or []), self._params(schema)).text

    def _params(self, schema: dict | type | None) -> SamplingParams | None:
        return None if schema is None else replace(self.sampling, grammar=grammar_for(schema))

    def clear_history(self) -> None:
        self.session.clear()

    # --- beyond the release ---------------------------------------------------------

    def stream(self, text: str, images: list[ImageInput] | None = None, on_progress=None) -> Iterator[str]:
        """Like `chat`, yielding the answer as it is generated; `last_reply` has the details.

        `on_progress(Progress)` reports the prompt being read (images encoded, positions done/total)."""
        yield from self.session.stream(text, list(images or []), on_progress=on_progress)

    def prefill_next_turn(self) -> int:
        """Evaluate the start every follow-up shares, e.g. while the user types; returns positions."""
        return self.session.prefill_next_turn()

    def prefill_images(self, images: list[ImageInput]) -> int:
        """Encode and evaluate the next question's images now, e.g. while the user types it; returns positions."""
        return self.session.prefill_images(list(images))

    @property
    def last_reply(self) -> Reply:
        return self.session.last_reply

    @property
    def counters(self) -> Counters:
        return self.session.counters

    def close(self) -> None:
        session = getattr(self, "session", None)
        if session is not None:
            session.close()  # stops the scheduler's thread, which holds the engine
        if getattr(self, "engine", None) is not None:
            self.engine.close()

    def __del__(self) -> None:
        # A discarded chatbot gives its memory back (the CLIP weights live in libmtmd, outside
        # Python's accounting) even when nobody called close().
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> HuatuoChatbot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
