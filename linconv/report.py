"""Human-readable results: rich tables on stdout. Library code returns data; this prints it."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

stdout = Console()


def print_table(table: Table) -> None:
    stdout.print(table)


def _layers(layers: list[int]) -> str:
    return ",".join(map(str, layers)) if layers else "none"


def conversion_table(summary, output) -> Table:
    """The summary printed at the end of ``linconv convert``."""
    table = Table(title=f"Converted → {output}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("architecture", summary.architecture)
    table.add_row("variant", summary.variant)
    table.add_row("layers converted", f"{len(summary.converted)} of {summary.layers}")
    table.add_row("layers kept (softmax)", _layers(summary.kept))
    table.add_row("group size / conv taps", f"{summary.group_size} / {summary.conv_kernel}")
    table.add_row("parameters added", f"{summary.params_added:,}")
    return table
