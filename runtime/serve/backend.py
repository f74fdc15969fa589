"""What answers a server's requests: this process's scheduler (`LocalBackend`), or replicas on a Ray cluster
(runtime/cluster/backend.py `ClusterBackend`); the routes see only this surface."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from huatuo_local.runtime.core.chat_task import ChatTask, start_chat
from huatuo_local.runtime.core.events import Event
from huatuo_local.runtime.core.scheduler import Scheduler
from starlette.concurrency import run_in_threadpool


class Answering(Protocol):
    """One answer in progress: the consumer may cancel it (its client went away)."""

    def cancel(self) -> None: ...


class Backend(Protocol):
    async def start(self, task: ChatTask, on_event: Callable[[Event], None]) -> Answering:
        """Start answering `task`; its events go to `on_event` (Piece..., then Done or Failed). Raises what
        core/chat_task.py `start_chat` raises when the task is refused."""
        ...

    def status(self) -> dict:
        """What /health shows a key holder: active and queued answers, and anything else worth knowing."""
        ...

    def complete(self) -> bool:
        """Whether everything this backend should run is ready (a cluster: every replica)."""
        ...

    def shut_down(self, grace_s: float) -> None: ...

    def close(self) -> None: ...


class LocalBackend:
    """This process's scheduler: what `serve` has always been."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    async def start(self, task: ChatTask, on_event: Callable[[Event], None]) -> Answering:
        return await run_in_threadpool(start_chat, self.scheduler, task, on_event)

    def status(self) -> dict:
        return {"active": self.scheduler.active(), "queued": self.scheduler.queued()}

    def complete(self) -> bool:
        return True

    def shut_down(self, grace_s: float) -> None:
        self.scheduler.shut_down(grace_s)

    def close(self) -> None:
        self.scheduler.close()
