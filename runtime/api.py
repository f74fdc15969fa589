"""`HuatuoChatbot`: a drop-in for the release's Python class, backed by llama.cpp (a front-end, layer 5).

    from huatuo_local import HuatuoChatbot
    bot = HuatuoChatbot("huatuo-vision-7b")
    output = bot.inference("What does the picture show?", ["scan.png"])
    print(output[0])
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from huatuo_local.models import defaults
from huatuo_local.runtime.core.loading import open_model
from huatuo_local.runtime.core.sampling import SamplingParams
from huatuo_local.runtime.core.session import Counters, Reply, Session
from huatuo_local.runtime.images.dicom import parse_window
from huatuo_local.runtime.images.loader import DEFAULT_MAX_PIXELS, ImageInput, LoadOptions


class HuatuoChatbot:
    """A loaded model and one conversation. `inference` is single-turn, `chat` keeps history."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        n_gpu_layers: int | None = None,
        n_ctx: int | None = None,
        threads: int | None = None,
        kv_type: str = "f16",
        mmproj_offload: bool = True,
        temperature: float = defaults.TEMPERATURE,
        repetition_penalty: float = defaults.REPETITION_PENALTY,
        max_new_tokens: int = defaults.MAX_NEW_TOKENS,
        top_k: int = defaults.TOP_K,
        top_p: float = defaults.TOP_P,
        seed: int | None = None,
        allow_unverified_vision: bool = False,
        offline: bool = True,
        window: str | None = None,
        frame: int | None = None,
        max_pixels: int | None = None,
        prefix_cache: bool = True,
        load: str | None = None,
        rpc: str | list[str] | None = None,
        tensor_split: list[float] | None = None,
        rpc_key_file: str | Path | None = None,
    ):
        self.sampling = SamplingParams(temperature=temperature, repetition_penalty=repetition_penalty,
                                       max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p, seed=seed).check()
        self.model, self.engine, cache = open_model(
            model, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, threads=threads, kv_type=kv_type,
            mmproj_offload=mmproj_offload, seed=seed, allow_unverified_vision=allow_unverified_vision,
            offline=offline, prefix_cache=prefix_cache, load=load, rpc=rpc, tensor_split=tensor_split,
            rpc_key_file=rpc_key_file)
        images = LoadOptions(parse_window(window), frame, max_pixels or DEFAULT_MAX_PIXELS)
        self.session = Session(self.engine, self.sampling, images, cache)

    # --- the release's interface ----------------------------------------------------

    def inference(self, query: str, image_paths: list[ImageInput] | None = None) -> list[str]:
        """One question, no history (the release's `inference`); returns [answer]."""
        self.session.clear()
        reply = self.session.ask(query, list(image_paths or []))
        self.session.clear()
        return [reply.text]

    def chat(self, text: str, images: list[ImageInput] | None = None) -> str:
        """One turn of a conversation; earlier turns and images stay in context."""
        return self.session.ask(text, list(images or [])).text

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
