"""Perplexity: exp(mean token NLL) over non-overlapping windows of a held-out text.

The loss is computed from the decoder's hidden states, ``lm_head`` applied a few hundred positions at
a time, so full-vocabulary logits for a whole window are never materialised:
for a 49K vocabulary a 1024-token window would otherwise need 200 MB of fp32 logits per row.
Each window is scored independently (no state carried between windows); its first token has no
context and is not scored, so a window of W tokens contributes W − 1 predictions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from linconv.bench.base import BenchInputs, per_role, ratio
from linconv.data import windows
from linconv.errors import LinconvError
from linconv.generate import sync_device
from linconv.loss import chunked_nll, model_parts
from linconv.progress import SILENT, Progress

if TYPE_CHECKING:  # run.py imports this module through the task registry
    from linconv.bench.run import BenchSettings


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    window: int  # tokens per window
    windows: int  # number of windows
    tokens: int  # tokens read (windows × window)
    scored: int  # tokens predicted (windows × (window − 1))
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


@torch.inference_mode()
def window_nll(model: nn.Module, ids: Tensor, chunk: int = 256) -> tuple[float, int]:
    """Summed NLL (fp32) and the number of scored tokens of ``ids`` [B, T], each row one window.

    Hidden states come from the decoder body in one forward; the LM head and the cross-entropy run
    ``chunk`` tokens at a time (:func:`linconv.loss.chunked_nll`).
    """
    decoder, head = model_parts(model)
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [B, T, d]
    targets = ids[:, 1:]
    nll = chunked_nll(hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1), head, chunk)
    return nll.item(), targets.numel()


def perplexity(
    model: nn.Module,
    tokens: Tensor,
    *,
    window: int = 1024,
    max_tokens: int | None = None,
    batch_size: int = 1,
    chunk: int = 256,
    progress: Progress = SILENT,
    task: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D ``tokens``, in non-overlapping windows of ``window`` tokens.

    At most ``max_tokens`` tokens are used, from the start. ``progress`` hears of every batch of
    windows under the name ``task``. Raises LinconvError when the text is shorter than one window.
    """
    if window < 2:
        raise LinconvError(f"the perplexity window must be at least 2 tokens, got {window}")
    if batch_size <= 0:
        raise LinconvError(f"batch size must be > 0, got {batch_size}")
    rows = windows(tokens, window, max_tokens)  # [N, window]
    device = next(model.parameters()).device
    total, scored = 0.0, 0
    progress.start(task, rows.shape[0])
    sync_device(device)
    t0 = time.perf_counter()
    for s in range(0, rows.shape[0], batch_size):
        nll, n = window_nll(model, rows[s : s + batch_size].to(device), chunk)
        total, scored = total + nll, scored + n
        progress.update(task, min(s + batch_size, rows.shape[0]), rows.shape[0], detail="windows")
    sync_device(device)
    seconds = time.perf_counter() - t0
    mean = total / scored
    progress.end(task)
    return PerplexityResult(math.exp(mean), mean, window, rows.shape[0], rows.numel(), scored, seconds)


# --- the ``ppl`` bench task -----------------------------------------------------------------------


def run_perplexity(inputs: BenchInputs, s: BenchSettings, progress: Progress) -> dict[str, PerplexityResult]:
    """Every model on the same tokens of the text: role -> result."""
    window, max_tokens = s.ppl_window, s.ppl_tokens or None
    return {
        role: perplexity(model, inputs.tokens, window=window, max_tokens=max_tokens, progress=progress, task=f"perplexity · {role}")
        for role, model in inputs.models.items()
    }


def perplexity_json(results: dict[str, PerplexityResult], s: BenchSettings) -> dict:
    """The windows once, then each role's figures and the ratio linearized ÷ original."""
    any_ = next(iter(results.values()))
    figures = lambda r: {"perplexity": r.perplexity, "nll": r.nll, "seconds": r.seconds, "tokens_per_s": r.tokens_per_s}
    out = {"window": any_.window, "windows": any_.windows, "tokens": any_.tokens, "scored": any_.scored, **per_role(results, figures)}
    out["ratio"] = ratio(*(out[r] and out[r]["perplexity"] for r in ("linearized", "original")))
    return out
