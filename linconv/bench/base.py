"""What every bench task shares: the two roles, the inputs a task receives, and the helpers its JSON uses.

A task (registered in :mod:`linconv.bench.tasks`) is a function ``run(inputs, settings, progress)``
that measures and returns its result; a second function turns that result into its part of the JSON
report. Both live in the task's own module, beside the result dataclass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from linconv.models import position_limit

ROLES = ("original", "linearized")  # the models compared, in the order tables and JSON list them


@dataclass
class BenchInputs:
    """The models a run compares and what they are measured on; every task receives it."""

    models: dict[str, nn.Module]  # role -> model, in ROLES order; no "original" with --baseline none
    sources: dict[str, str | None]  # role -> the folder or hub id it was loaded from (a max-length trial reloads it)
    device: torch.device
    tokens: Tensor | None = None  # the text, tokenized: present when a task that needs it runs
    tokenizer: Any = None  # the models' (shared) tokenizer, when the checkpoint has one

    def with_tokenizer(self) -> dict[str, tuple[nn.Module, Any]]:
        """role -> (model, tokenizer): how the evaluations (downstream, longppl, passkey) take their models."""
        return {role: (model, self.tokenizer) for role, model in self.models.items()}


def weights_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def per_role(results: dict[str, Any], fn: Callable[[Any], Any]) -> dict[str, Any]:
    """``{role: fn(result) or None}`` for every role, so the JSON always has both keys."""
    return {role: fn(results[role]) if role in results else None for role in ROLES}


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing (or ``b`` is 0)."""
    return a / b if a is not None and b else None


def position_limit_of(models) -> int | None:
    """The fewest tokens any of ``models`` takes (None: no hard limit)."""
    limits = [n for m in models if (n := position_limit(m.config)) is not None]
    return min(limits, default=None)
