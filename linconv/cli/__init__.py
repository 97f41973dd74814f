"""The ``linconv`` command line: one Typer file per command, each thin (options -> library -> report)."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from linconv.cli.common import console, debugging

try:  # typer 0.2x ships its own copy of click; older ones use click itself
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError
from linconv.version import __version__


class _OneLineErrors(TyperGroup):
    """Usage errors (a missing argument, a value of the wrong type) as one line and exit 1, like
    every other bad input, instead of click's framed box and exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as e:
            if debugging():
                raise
            hint = f" (see linconv {e.ctx.info_name} --help)" if e.ctx is not None and e.ctx.parent is not None else " (see --help)"
            console.print(f"[bold red]error:[/] {e.format_message()}{hint}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except typer.Abort:
            console.print("[yellow]interrupted[/]")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
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
    signal.signal(signal.SIGINT, signal.default_int_handler)  # linconv/__init__.py exits quietly until here
    app()
