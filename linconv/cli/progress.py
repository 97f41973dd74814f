"""The rich implementation of :class:`linconv.progress.Progress`: one bar per task, figures beside it.

On a terminal the bars redraw in place; in a log file (not a terminal) every task prints a line at
each twentieth of its total instead, so long runs stay readable there too.
"""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from linconv.cli.common import console
from linconv.progress import Progress as ProgressProtocol


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


class RichProgress(ProgressProtocol):
    """Bars on stderr; use as a context manager so a failure never leaves a live display behind."""

    def __init__(self, width: int = 28):
        self.bars = Progress(
            TextColumn(f"[bold]{{task.description:<{width}}}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.ids: dict[str, int] = {}
        self.logged: dict[str, int] = {}

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # the error is the one line left: no half-drawn bars above it
            for task in list(self.bars.task_ids):
                self.bars.remove_task(task)
            self.bars.live.transient = True
        self.close()

    def start(self, task: str, total: float | None = None, completed: float = 0) -> None:
        if not self.bars.live.is_started:
            self.bars.start()
        if task in self.ids:
            self.bars.reset(self.ids[task], total=total, completed=completed)
        else:
            self.ids[task] = self.bars.add_task(task, total=total, completed=completed, detail="")

    def update(self, task: str, completed: float, total: float | None = None, **fields: Any) -> None:
        if task not in self.ids:
            self.start(task, total)
        detail = "  ".join(_show(v) if k == "detail" else f"{k.replace('_', ' ')} {_show(v)}" for k, v in fields.items())
        bar = self.ids[task]
        if total is not None:
            self.bars.update(bar, total=total)
        self.bars.update(bar, completed=completed, detail=detail)
        whole = self.bars.tasks[bar].total
        if not console.is_terminal and whole:  # a log file gets a line per twentieth instead of a bar
            tick = int(20 * completed / whole)
            if tick > self.logged.get(task, -1):
                self.logged[task] = tick
                self.message(f"{task} {completed:g}/{whole:g}  {detail}".rstrip())

    def message(self, text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    def end(self, task: str) -> None:
        if task in self.ids:
            bar = self.bars.tasks[self.ids[task]]
            self.bars.update(bar.id, total=bar.total or bar.completed or 1, completed=bar.total or bar.completed or 1)

    def close(self) -> None:
        if self.bars.live.is_started:  # stopping a display that never started prints a blank line
            self.bars.stop()
