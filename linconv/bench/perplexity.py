"""Perplexity: exp(mean token NLL) over non-overlapping windows of a held-out text.

The loss is computed from the decoder's hidden states, ``lm_head`` applied a few hundred positions at
a time (notes/hf_internals.md §5), so full-vocabulary logits for a whole window are never materialised:
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
import torch.nn.functional as F
from torch import Tensor, nn

from linconv.data import windows
from linconv.errors import LinconvError


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


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The body that returns hidden states (``model.model`` / ``model.transformer``) and the LM head."""
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        raise LinconvError(f"{type(model).__name__} has no separate decoder body and LM head; cannot compute a chunked loss")
    return body, head


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def window_nll(model: nn.Module, ids: Tensor, chunk: int = 256) -> tuple[float, int]:
    """Summed NLL (fp32) and the number of scored tokens of ``ids`` [B, T], each row one window.

    Hidden states come from the decoder body in one forward; ``lm_head`` and the cross-entropy run
    ``chunk`` positions at a time.
    """
    body, head = decoder_and_head(model)
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state  # [B, T, d]
    targets = ids[:, 1:]
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for s in range(0, targets.shape[1], chunk):
        e = min(s + chunk, targets.shape[1])
        logits = head(hidden[:, s:e]).float()  # [B, e − s, V]
        total += F.cross_entropy(logits.flatten(0, 1), targets[:, s:e].flatten(), reduction="sum").double()
    return total.item(), targets.numel()


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
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, rows.shape[0], batch_size):
        nll, n = window_nll(model, rows[s : s + batch_size].to(device), chunk)
        total, scored = total + nll, scored + n
        if progress is not None:
            progress(min(s + batch_size, rows.shape[0]), rows.shape[0])
    sync(device)
    seconds = time.perf_counter() - t0
    mean = total / scored
    return PerplexityResult(math.exp(mean), mean, window, rows.shape[0], rows.numel(), scored, seconds)
