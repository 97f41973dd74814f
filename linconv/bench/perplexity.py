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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from linconv.data import windows
from linconv.errors import LinconvError
from linconv.generate import sync_device
from linconv.loss import chunked_nll, model_parts


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
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D ``tokens``, in non-overlapping windows of ``window`` tokens.

    At most ``max_tokens`` tokens are used, from the start. ``progress(done, total)`` is called after
    every batch of windows. Raises LinconvError when the text is shorter than one window.
    """
    if window < 2:
        raise LinconvError(f"the perplexity window must be at least 2 tokens, got {window}")
    if batch_size <= 0:
        raise LinconvError(f"batch size must be > 0, got {batch_size}")
    rows = windows(tokens, window, max_tokens)  # [N, window]
    device = next(model.parameters()).device
    total, scored = 0.0, 0
    sync_device(device)
    t0 = time.perf_counter()
    for s in range(0, rows.shape[0], batch_size):
        nll, n = window_nll(model, rows[s : s + batch_size].to(device), chunk)
        total, scored = total + nll, scored + n
        if progress is not None:
            progress(min(s + batch_size, rows.shape[0]), rows.shape[0])
    sync_device(device)
    seconds = time.perf_counter() - t0
    mean = total / scored
    return PerplexityResult(math.exp(mean), mean, window, rows.shape[0], rows.numel(), scored, seconds)
