"""Leakage check: does any output at position ≤ t depend on a token after t?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from linconv.bench.base import BenchInputs
from linconv.progress import Progress

if TYPE_CHECKING:  # run.py imports this module through the task registry
    from linconv.bench.run import BenchSettings


@dataclass
class LeakageResult:
    seq_len: int
    cut_points: list[int]
    max_change: float  # largest |Δ logit| at positions ≤ t when tokens after t change
    tolerance: float

    @property
    def leaks(self) -> bool:
        return self.max_change > self.tolerance


@torch.inference_mode()
def leakage_check(model: nn.Module, seq_len: int = 96, cuts: int = 3, seed: int = 0, tolerance: float = 1e-4) -> LeakageResult:
    """Perturb the tokens after a few cut points t; the logits at ≤ t must not move."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    base = model(ids.to(device), use_cache=False).logits.float()
    points = torch.linspace(seq_len // (cuts + 1), seq_len - 2, cuts).long().tolist()
    worst = 0.0
    for t in points:
        other = ids.clone()
        other[:, t + 1 :] = torch.randint(0, vocab, (seq_len - t - 1,), generator=g)
        logits = model(other.to(device), use_cache=False).logits.float()
        worst = max(worst, (logits[:, : t + 1] - base[:, : t + 1]).abs().max().item())
    return LeakageResult(seq_len, points, worst, tolerance)


# --- the ``leakage`` bench task -------------------------------------------------------------------


def run_leakage(inputs: BenchInputs, s: BenchSettings, progress: Progress) -> LeakageResult:
    """The linearized model only: the original is causal by construction."""
    task = "leakage · linearized"
    progress.start(task, 1)
    result = leakage_check(inputs.models["linearized"])
    progress.update(task, 1, 1, detail="leaks!" if result.leaks else "causal")
    progress.end(task)
    return result


def leakage_json(result: LeakageResult, s: BenchSettings) -> dict:
    return {**asdict(result), "leaks": result.leaks}
