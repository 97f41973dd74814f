"""The ``linconv`` command line: one Typer file per command, each thin (options -> library -> report)."""

from __future__ import annotations

from typing import Annotated

import typer

from linconv.version import __version__

app = typer.Typer(
    name="linconv",
    help="Turn a Hugging Face causal LM into a linear-attention model and measure what was gained.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"linconv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """linconv: convert, fine-tune, benchmark and generate with linearized models."""


from linconv.cli.convert import convert_command  # noqa: E402

app.command("convert")(convert_command)

from linconv.cli.finetune import finetune_command  # noqa: E402

app.command("finetune")(finetune_command)

from linconv.cli.generate import generate_command  # noqa: E402

app.command("generate")(generate_command)

from linconv.cli.bench import bench_command  # noqa: E402

app.command("bench")(bench_command)


def main() -> None:
    app()
