"""A chat request as a server hands it to a scheduler: the conversation, its pictures, how to sample, whose it
is. Plain data, so that it can cross to another process (runtime/cluster/) and be started there exactly as
here: `start_chat` is the one way a server's request becomes a scheduled job, local or on a replica."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.prompt import Turn
from huatuo_local.runtime.core.events import Event
from huatuo_local.runtime.core.items import ImageItem, conversation_items
from huatuo_local.runtime.core.sampling import SamplingParams
from huatuo_local.runtime.core.scheduler import Job, Scheduler


class BadRequest(HuatuoError):
    """The request cannot be answered by this model as asked; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # crosses processes intact (HuatuoError's pickling knows one argument)
        return (BadRequest, (str(self), self.param))


@dataclass
class ChatTask:
    turns: list[Turn]
    images: list[ImageItem]
    params: SamplingParams
    seed: int  # always given: a sampled answer can be asked for again exactly (core/record.py)
    tenant: str = ""  # an API key's digest: prefixes are shared only within one (core/scheduler.py Job.tenant)

    def route_key(self) -> str | None:
        """Which earlier work this conversation can reuse, as a short digest: its tenant and its first
        picture when the first turn has one (the prompt before it is the same for every conversation, so
        a replica holding that picture's state holds the conversation's prefix), else its first question.
        A follow-up has the key of the turn it follows; another tenant never has the same key."""
        if not self.turns:
            return None
        first = self.images[0].digest if self.turns[0].n_images and self.images else "text:" + self.turns[0].text
        return hashlib.sha256(f"{self.tenant}\0{first}".encode()).hexdigest()[:24]


def start_chat(scheduler: Scheduler, task: ChatTask, on_event: Callable[[Event], None]) -> Job:
    """Tokenize `task` as the release does and submit it; raises BadRequest, ContextFull, QueueFull or
    ShuttingDown (runtime/core/scheduler.py) when it is refused. Tokenizing takes time: call it off an event
    loop."""
    engine = scheduler.engine
    if any(t >= engine.n_vocab for t, _ in task.params.logit_bias):
        raise BadRequest(f"'logit_bias' names a token id the model does not have (it has {engine.n_vocab})",
                         "logit_bias")
    items = conversation_items(engine.tokenizer.tokenize, task.turns, task.images)
    job = Job(items, task.params, np.random.default_rng(task.seed), tenant=task.tenant, on_event=on_event)
    return scheduler.submit(job)
