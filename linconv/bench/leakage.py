"""Leakage check: does any output at position ≤ t depend on a token after t?

Built to catch every leak, not to pass: a model whose config says it is not causal (linformer, an
unmasked conv) is reported as leaking without running it. Otherwise the sequence spans at least two
boundaries of every block the variant uses (groups of the local/global split, chunks of the plain
kernels) plus the conv's taps, and the cut points t sit just before each boundary and inside the
conv's reach after it, so the local, the global and the conv paths each see perturbed tokens. For
the check linconv's own new parameters are randomised (and restored afterwards): a zero-initialised
conv or a small α would otherwise hide a leak that fine-tuning opens. The decoder's last hidden
states are compared (the output head maps them position by position), so no [T x vocab] logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from linconv.attention.spec import AttentionSpec
from linconv.bench.base import BenchInputs
from linconv.config import LinearizeConfig
from linconv.loss import model_parts
from linconv.models import position_limit
from linconv.models.hf import linconv_tensor_names
from linconv.progress import Progress

if TYPE_CHECKING:  # run.py imports this module through the task registry
    from linconv.bench.run import BenchSettings


@dataclass
class LeakageResult:
    seq_len: int
    cut_points: list[int]
    max_change: float  # largest |Δ hidden| at positions ≤ t when tokens after t change, over max |hidden|
    tolerance: float
    boundaries: list[int] = field(default_factory=list)  # group / chunk boundaries inside the sequence
    randomized: int = 0  # new linconv parameters randomised for the check
    declared: str | None = None  # the config says the model is not causal (then nothing ran)

    @property
    def leaks(self) -> bool:
        return self.declared is not None or self.max_change > self.tolerance


def _layer_specs(cfg: LinearizeConfig | None, num_layers: int) -> list[AttentionSpec]:
    """The linear layers' specs (softmax layers kept by a hybrid have none)."""
    return [] if cfg is None else [s for s in cfg.specs(num_layers) if s is not None]


def _declared_noncausal(specs: list[AttentionSpec]) -> str | None:
    leak = next((s.leak for s in specs if s.leak), None)
    return None if leak is None else f"{leak} is not causal"


def _spans(specs: list[AttentionSpec]) -> list[int]:
    """Block lengths whose boundaries the computation crosses: groups (local scores), chunks (kernels)."""
    return sorted({s.group_size for s in specs if s.score} | {s.chunk_size for s in specs if s.feature and not s.score})


def _cut_points(spans: list[int], kernel: int, seq_len: int) -> tuple[list[int], list[int]]:
    """(boundaries, cuts): the first two boundaries of every span, a cut just before each and one
    inside the conv's reach after it, plus one early and one at the end."""
    reach = max(1, kernel // 2)
    boundaries = sorted({b for span in spans for b in (span, 2 * span) if b < seq_len})
    cuts = {reach, seq_len - 2} | {c for b in boundaries for c in (b - 1, b + reach)}
    return boundaries, sorted(c for c in cuts if 0 <= c <= seq_len - 2)


@torch.inference_mode()
def _hidden(decoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return decoder(input_ids=ids, use_cache=False).last_hidden_state.float()


def leakage_check(
    model: nn.Module, *, seed: int = 0, tolerance: float = 1e-4, randomize: bool = True, trust_config: bool = True
) -> LeakageResult:
    """Perturb the tokens after each cut point t; the hidden states at ≤ t must not move (see the
    module docstring). ``randomize=False`` keeps the model's parameters as they are; ``trust_config=False``
    measures even a model whose config declares it non-causal (tests)."""
    raw = getattr(model.config, "linconv", None)
    specs = _layer_specs(LinearizeConfig.from_dict(raw) if raw is not None else None, model.config.num_hidden_layers)
    declared = _declared_noncausal(specs)
    if declared is not None and trust_config:
        return LeakageResult(0, [], math.nan, tolerance, declared=declared)
    spans = _spans(specs)
    kernel = max((s.conv_taps for s in specs), default=0)
    seq_len = 2 * max(spans, default=40) + kernel + 16
    limit = position_limit(model.config)
    seq_len = min(seq_len, limit) if limit is not None else seq_len
    boundaries, cuts = _cut_points(spans, kernel, seq_len)

    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    new = [params[n] for n in linconv_tensor_names(model) if n in params] if randomize else []
    saved = [p.detach().clone() for p in new]
    decoder, _ = model_parts(model)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    try:
        with torch.no_grad():
            for p in new:
                p.add_((0.5 * torch.randn(p.shape, generator=g)).to(p))
        base = _hidden(decoder, ids.to(device))
        scale = base.abs().max().clamp(min=1e-6)
        worst = 0.0
        for t in cuts:
            other = ids.clone()
            other[:, t + 1 :] = (ids[:, t + 1 :] + torch.randint(1, vocab, (seq_len - t - 1,), generator=g)) % vocab  # every token changes
            moved = (_hidden(decoder, other.to(device))[:, : t + 1] - base[:, : t + 1]).abs().max()
            worst = max(worst, (moved / scale).item())
    finally:
        with torch.no_grad():
            for p, old in zip(new, saved):
                p.copy_(old)
    return LeakageResult(seq_len, cuts, worst, tolerance, boundaries, len(new))


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
