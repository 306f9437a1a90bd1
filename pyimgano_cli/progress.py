"""Rich progress bars behind the engine's small Progress protocol.

Every bar shows done/total, the rate and the time left; at 80 columns the description wraps onto
a second line rather than being cut, and the counts, rate and ETA keep their full width.
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second (images, patches), from rich's running speed estimate."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed and task.completed:  # one big step: the mean rate so far
            speed = task.completed / task.elapsed
        if speed is None:
            return Text("-/s", style="progress.data.speed")
        return Text(f"{speed:,.0f}/s" if speed >= 100 else f"{speed:.2g}/s", style="progress.data.speed")


def columns() -> list:
    return [SpinnerColumn(), TextColumn("{task.description}", markup=False, table_column=Column(ratio=1, overflow="fold")),
            BarColumn(bar_width=10), MofNCompleteColumn(table_column=Column(no_wrap=True)),
            RateColumn(table_column=Column(no_wrap=True)), TextColumn("eta"), TimeRemainingColumn()]


class RichProgress:
    def __init__(self, console: Console):
        self._bar: Progress | None = None
        self._task = None
        self._console = console

    def start(self, description: str, total: int | None = None) -> None:
        self.stop()
        self._bar = Progress(*columns(), console=self._console, transient=False, expand=True)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
