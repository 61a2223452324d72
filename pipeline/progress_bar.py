"""The live progress bar a person at a terminal (or a Jupyter cell) sees, drawn with rich.

Its own module so that rich is imported only when a bar is drawn: a run writing plain
lines to a log, or no progress at all, never pays for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TextIO

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.text import Text


class TwoLineProgress(Progress):
    """The bar on one line, the per-status counts under it, so both fit 80 columns."""

    status: str = "starting"

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield Text("  " + self.status, overflow="ellipsis", no_wrap=True)


def start_bar(stream: TextIO | None) -> tuple[TwoLineProgress, TaskID]:
    """Start the bar on ``stream`` (a terminal), or as a Jupyter widget when None."""
    console = (
        Console(force_jupyter=True) if stream is None else Console(file=stream, force_terminal=True)
    )
    progress = TwoLineProgress(
        TextColumn("[bold]klein-batch"),
        BarColumn(bar_width=30),
        TextColumn("{task.completed}/{task.fields[of]}"),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TextColumn("{task.fields[credits]}"),
        console=console,
        refresh_per_second=4,
    )
    task = progress.add_task("run", total=None, of="?", rate="", eta="?", credits="")
    progress.start()
    return progress, task
