"""An importance matrix computed by running calibration conversations through the model itself.

Each conversation is the release's prompt (its image first, through the model's own vision encoder,
so the positions that carry the image count), then the answer as the assistant's text; without an
answer (the user's own images), the model's own greedy answer, generated as it is observed. Every layer
weight's input rows are squared and summed per column (engine/activations.py), at every position:
what llama.cpp's `llama-imatrix` accumulates, which sees text only. Each conversation is evaluated
on its own, from an empty sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.imatrix import ImportanceMatrix, write_imatrix
from huatuo_local.models.interrupt import cancelled
from huatuo_local.models.prompt import Turn, render_segments
from huatuo_local.runtime.core.items import ImageItem, image_item, prompt_items
from huatuo_local.runtime.engine.engine import Engine, EngineOptions
from huatuo_local.runtime.engine.probe import vision_warning
from huatuo_local.runtime.images.loader import LoadOptions, load_rgb, prepare
from huatuo_local.runtime.quantize import calibration as calib
from huatuo_local.runtime.quantize.calibration import Conversation

CALIBRATION_CTX = 4096
BATCH = 512  # every position's output is computed: the logits of a batch are BATCH x vocabulary floats
ANSWER_TOKENS = 96  # the longest answer the model writes itself for a conversation that has none


def conversation_items(engine: Engine, conversation: Conversation) -> list:
    """The release's prompt for one turn with its answer after it: token ids, and the image in its place."""
    images = []
    if conversation.image is not None:
        images = [image_item(prepare(load_rgb(conversation.image, LoadOptions()), engine.vision))]
    segments = render_segments([Turn(conversation.question, len(images), conversation.answer or None)])
    return prompt_items(engine.tokenizer.tokenize, segments, images)


def evaluate(engine: Engine, items: list, answer_tokens: int = 0) -> None:
    """Evaluate `items` from position 0 of sequence 0 (text in batches, images as embedding chunks),
    then up to `answer_tokens` of the model's greedy answer."""
    engine.seq_rm(0, 0)
    pos, i, last = 0, 0, 0
    while i < len(items):
        if isinstance(items[i], ImageItem):
            vision_warning(engine.options.allow_unverified_vision)  # refuses a library that fails the probe
            embd = engine.encode_image(items[i].picture)
            for start in range(0, len(embd), engine.options.ubatch):
                chunk = embd[start:start + engine.options.ubatch]
                engine.decode_embeddings(0, chunk, pos)
                pos += len(chunk)
            i += 1
            continue
        run = []
        while i < len(items) and not isinstance(items[i], ImageItem) and len(run) < engine.options.n_batch:
            run.append(int(items[i]))
            i += 1
        engine.decode_tokens([(0, tok, pos + k, True) for k, tok in enumerate(run)])
        pos, last = pos + len(run), len(run) - 1
    for _ in range(min(answer_tokens, engine.options.n_ctx - pos)):
        token = int(np.argmax(engine.logits_at(last)))
        if token == engine.eos_id:
            break
        engine.decode_tokens([(0, token, pos, True)])
        pos, last = pos + 1, 0
    engine.seq_rm(0, 0)


def compute(llm: Path, mmproj: Path, conversations: list[Conversation], threads: int | None = None,
            progress: Callable[[str, int, int], None] | None = None, label: str = "huatuo-local") -> ImportanceMatrix:
    """The importance matrix of the model `llm` (+ its `mmproj`) over `conversations`."""
    matrix = ImportanceMatrix(datasets=[label], chunk_size=CALIBRATION_CTX)
    options = EngineOptions(n_ctx=CALIBRATION_CTX, n_batch=BATCH, n_ubatch=BATCH, n_threads=threads,
                            kv_type="f32", output_all=True, observe_matmuls=matrix.add, load="mmap")
    with Engine(llm, mmproj, options) as engine:
        for k, conversation in enumerate(conversations):
            if cancelled():  # interrupted: the command is unwinding already (models/interrupt.py)
                raise KeyboardInterrupt
            if progress:
                progress("importance matrix", k, len(conversations))
            evaluate(engine, conversation_items(engine, conversation),
                     0 if conversation.answer else ANSWER_TOKENS)
            matrix.chunk_count += 1
        if progress:
            progress("importance matrix", len(conversations), len(conversations))
    return matrix


def maker(conversations: list[Conversation], label: str, threads: int | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> Callable[[Path, Path, Path], None]:
    """What `convert(..., imatrix=)` calls with the lossless model it wrote: compute, then save the matrix."""
    def make(llm: Path, mmproj: Path, destination: Path) -> None:
        write_imatrix(destination, compute(llm, mmproj, conversations, threads, progress, label))

    return make


def matrix_source(choice: str | None, calibration: Path | None = None, threads: int | None = None,
                  progress: Callable[[str, int, int], None] | None = None):
    """What `--imatrix auto|FILE [--calibration FOLDER|JSON]` gives the converter: None, a file, or a maker
    over the bundled (or the user's) conversations. The user's calibration is read now, before any work."""
    if calibration is not None and choice != "auto":
        raise HuatuoError("--calibration is used only to compute a matrix: add --imatrix auto")
    if choice is None:
        return None
    if choice != "auto":
        return Path(choice).expanduser()
    conversations = calib.from_user(calibration) if calibration is not None else calib.bundled()
    label = calib.describe(conversations, Path(calibration).name if calibration is not None else calib.BUNDLED_NAME)
    return maker(conversations, label, threads, progress)
