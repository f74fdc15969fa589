"""Progress bars for long work (download, convert, quantize), on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# Stages that count things, not bytes (by the start of their name): what their bar says it counts.
COUNTED = {"quantize": "tensors", "importance matrix": "conversations"}


def unit_of(stage: str) -> str:
    return next((unit for prefix, unit in COUNTED.items() if stage.startswith(prefix)), "bytes")


class _AmountColumn(ProgressColumn):
    """Bytes as a download shows them (1.2/4.7 GB), anything else as a count with its unit (27/27 tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()

    def render(self, task) -> Text:
        unit = unit_of(task.description)
        if unit == "bytes":
            return self._bytes.render(task)
        return Text(f"{int(task.completed)}/{int(task.total or 0)} {unit}", style="progress.download")


class StageProgress:
    """A (stage, done, total) callback that shows one bar per stage, on stderr."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<18}"), BarColumn(), _AmountColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> StageProgress:
        return self  # the bars appear with the first stage: a command that fails first prints only its error

    def __exit__(self, *exc: object) -> None:
        if self._tasks:
            self._progress.stop()

    def update(self, stage: str, done: int, total: int) -> None:
        if not self._tasks:
            self._progress.start()
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)


class PromptStatus:
    """One transient line on stderr while the model loads or reads the prompt; it disappears when the
    answer starts. Quiet unless stderr is a terminal (never in --json or piped output)."""

    def __init__(self, enabled: bool | None = None):
        import sys

        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._live = None
        self._t0 = 0.0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        import time

        from rich.live import Live
        from rich.text import Text

        if self._live is None:
            self._t0 = time.perf_counter()
            self._live = Live(Text(text), console=Console(stderr=True), transient=True, refresh_per_second=4)
            self._live.start(refresh=True)
        else:
            self._live.update(Text(text), refresh=True)

    def __call__(self, progress) -> None:
        """A scheduler Progress: images being encoded, then positions read of the prompt's total."""
        if not self.enabled:
            return
        import time

        elapsed = time.perf_counter() - self._t0 if self._live is not None else 0.0
        if progress.stage == "encoding image":
            self.show(f"encoding the image… {elapsed:.0f} s")
            return
        rate = progress.done / elapsed if elapsed > 0 else 0.0
        eta = f", about {(progress.total - progress.done) / rate:.0f} s left" if rate > 0 else ""
        self.show(f"reading the prompt: {progress.done}/{progress.total} positions, {rate:.0f}/s{eta}")

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
