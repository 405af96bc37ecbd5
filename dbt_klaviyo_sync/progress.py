"""Live progress of a sync: a bar per model with records done, rate, ETA and the time spent
waiting for Klaviyo's rate limits. Only on a terminal; scripts and CI logs get none."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ProgressReporter(Protocol):
    def start(self, model: str, total: int) -> None:
        """A model's send begins: `total` records to act on."""

    def advance(self, records: int, rate_limit_wait: float) -> None:
        """`records` more are done; the model's requests have waited this long in all."""

    def finish(self) -> None:
        """The model is done (or stopped)."""

    def close(self) -> None:
        """The run is over."""


class NoProgress:
    """For pipes, CI logs, `--quiet` and `--output json`."""

    def start(self, model: str, total: int) -> None:
        pass

    def advance(self, records: int, rate_limit_wait: float) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class _RecordsPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} records/s" if speed else "", style="progress.data.speed")


class BarProgress:
    """A rich progress bar per model, on stderr, so stdout stays for the summary."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RecordsPerSecond(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[waits]}"),
            console=console or Console(stderr=True),
        )
        self._task: TaskID | None = None

    def start(self, model: str, total: int) -> None:
        if not self._progress.live.is_started:
            self._progress.start()
        self._task = self._progress.add_task(model, total=total, waits="")

    def advance(self, records: int, rate_limit_wait: float) -> None:
        if self._task is None:
            return
        waits = f"{rate_limit_wait:,.1f} s waiting for rate limits" if rate_limit_wait else ""
        self._progress.update(self._task, advance=records, waits=waits)

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop_task(self._task)
            self._task = None

    def close(self) -> None:
        self._progress.stop()
