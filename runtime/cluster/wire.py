"""What crosses between the server and a replica besides the task (core/chat_task.py) and the scheduler's
events (core/events.py): the replica's first word on a task (`Accepted` or `Refused`), and failures in a form
that survives pickling (several of our exceptions take other arguments than their message)."""

from __future__ import annotations

from dataclasses import dataclass

from huatuo_local.runtime.core.chat_task import BadRequest
from huatuo_local.runtime.core.sampling import NonFiniteScores
from huatuo_local.runtime.core.scheduler import ContextFull, QueueFull, ShuttingDown
from huatuo_local.runtime.engine.engine import EngineError


class ReplicaLost(EngineError):
    """The replica answering a request stopped (its process or machine died) after the answer had begun."""


@dataclass(frozen=True)
class Accepted:
    """The replica took the task; `replica` says which (its id, node and process)."""

    replica: dict


@dataclass(frozen=True)
class Refused:
    """The replica refused the task before starting it: what core/chat_task.py `start_chat` raised."""

    kind: str
    message: str
    param: str | None = None

    @classmethod
    def of(cls, exc: Exception) -> Refused:
        kind = {BadRequest: "bad_request", ContextFull: "context_full", QueueFull: "queue_full",
                ShuttingDown: "shutting_down"}.get(type(exc), "engine")
        return cls(kind, str(exc), getattr(exc, "param", None))

    def error(self) -> Exception:
        if self.kind == "bad_request":
            return BadRequest(self.message, self.param)
        return {"context_full": ContextFull, "queue_full": QueueFull,
                "shutting_down": ShuttingDown}.get(self.kind, EngineError)(self.message)


@dataclass(frozen=True)
class Fault:
    """An answer's failure on the replica, as data; `error()` is the exception the server maps to a status."""

    kind: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> Fault:
        kind = ("non_finite" if isinstance(exc, NonFiniteScores) else "shutting_down" if isinstance(exc, ShuttingDown)
                else "engine")
        return cls(kind, str(exc))

    def error(self) -> Exception:
        if self.kind == "non_finite":
            return NonFiniteScores()
        return (ShuttingDown if self.kind == "shutting_down" else EngineError)(self.message)
