"""What every command shares: one-line errors, dtype/device parsing, the console."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
import typer
from rich.console import Console
from transformers.utils import logging as transformers_logging

from linconv.errors import LinconvError

console = Console(stderr=True)
transformers_logging.disable_progress_bar()  # linconv shows its own progress


def fail(message: str, code: int = 1):
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly(fn: Callable) -> Callable:
    """Turn user errors into one red line and a non-zero exit; Ctrl-C exits 130 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LinconvError as e:
            fail(str(e))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            sys.exit(130)

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
