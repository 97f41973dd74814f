"""How long-running library calls tell their caller what happens, without printing anything.

``finetune``, ``bench`` and ``generate`` take a :class:`Progress`. The CLI passes a rich one
(``linconv.cli.progress.RichProgress``); a library user passes nothing (``SILENT``) or a subclass.
A task is named by a label; ``fields`` carry the figures worth showing beside it (loss, tok/s, …).
"""

from __future__ import annotations

from typing import Any


class Progress:
    """Receives what a run does; every method is optional and the base class says nothing."""

    def start(self, task: str, total: float | None = None, completed: float = 0) -> None:
        """``task`` begins; ``total`` units of work (None: unknown), ``completed`` of them already done."""

    def update(self, task: str, completed: float, total: float | None = None, **fields: Any) -> None:
        """``task`` has done ``completed`` units (``total`` may be learned late); ``fields`` to show."""

    def message(self, text: str) -> None:
        """A line worth showing above the bars (an evaluation, a skipped stage, an interruption)."""

    def end(self, task: str) -> None:
        """``task`` is done."""


SILENT = Progress()
