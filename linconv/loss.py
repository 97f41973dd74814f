"""Next-token loss computed from hidden states in chunks, so full-vocabulary logits never exist at once.

Used by perplexity (bench), fine-tuning and the Medusa heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

LOGITS_BUDGET = 2**24  # logits elements per chunk (64 MB in fp32)


def chunked_nll(hidden: Tensor, targets: Tensor, head: nn.Module, chunk_tokens: int | None = None) -> Tensor:
    """Σ cross-entropy (fp32) of ``head(hidden)`` against ``targets``: hidden [N, D], targets [N].

    Logits are made ``chunk_tokens`` rows at a time (default: LOGITS_BUDGET / vocab); under autograd
    each chunk is recomputed in backward instead of kept, so full [N, V] logits never exist.
    """
    chunk = chunk_tokens or max(1, LOGITS_BUDGET // head.weight.shape[0])
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        if need_grad and hidden.shape[0] > chunk:
            total = total + grad_checkpoint(_nll_sum, h, t, head, use_reentrant=False)
        else:
            total = total + _nll_sum(h, t, head)
    return total


def _nll_sum(h: Tensor, t: Tensor, head: nn.Module) -> Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def model_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder without output head, output head) of a causal LM, peft-wrapped or not."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix), model.get_output_embeddings()


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``model`` on ids [B, T], from hidden states in chunks."""
    decoder, head = model_parts(model)
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [B, T, D]
    targets = ids[:, 1:].reshape(-1)
    return chunked_nll(hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets, head) / targets.numel()
