"""What every command shares: one-line errors, dtype/device parsing, the console."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable

import torch
import typer
from rich.console import Console
from transformers.utils import logging as transformers_logging

from linconv.errors import LinconvError, first_line

console = Console(stderr=True)
transformers_logging.disable_progress_bar()  # linconv shows its own progress


def fail(message: str, code: int = 1):
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def debugging() -> bool:
    """``LINCONV_DEBUG=1``: let tracebacks through, for bug reports."""
    return os.environ.get("LINCONV_DEBUG", "") not in ("", "0")


def explain(exc: BaseException) -> str:
    """One line for an exception that is not a LinconvError: what to do where we know, else its type
    and first line (with LINCONV_DEBUG=1 the traceback is shown instead)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of device memory; try a smaller --prefill-chunk, --batch-size or --seq-len, or --dtype bf16"
    if isinstance(exc, MemoryError):
        return "out of memory; try a smaller --prefill-chunk, --batch-size or --seq-len"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on the device ({exc.filename or 'while writing'}); free some and run again"
    return f"{first_line(exc, with_type=True)} (set LINCONV_DEBUG=1 for the traceback)"


def friendly(fn: Callable) -> Callable:
    """The error boundary of every command: a LinconvError (a user error) or any other exception
    becomes one red line and exit 1; Ctrl-C exits 130 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LinconvError as e:
            fail(str(e))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            sys.exit(130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:
            if debugging():
                raise
            fail(explain(e))

    return wrapper


def parse_device(name: str | None) -> torch.device:
    """``auto`` (default): cuda when available, else cpu."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LinconvError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LinconvError("--device cuda requested but no CUDA device is available")
    return device


def parse_layers(text: str | None) -> list[int]:
    """``"0,5"`` -> [0, 5]."""
    if not text:
        return []
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise LinconvError(f"--keep-softmax-layers takes comma-separated layer numbers, got {text!r}") from None
