"""Next-token and distillation losses computed from hidden states in chunks, so full-vocabulary
logits never exist at once.

Used by perplexity (bench), fine-tuning and the Medusa heads.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from linconv.teacher import teacher_mode

LOGITS_BUDGET = 2**24  # logits elements per chunk (64 MB in fp32)


def chunked_nll(hidden: Tensor, targets: Tensor, head: nn.Module, chunk_tokens: int | None = None) -> Tensor:
    """Σ cross-entropy (fp32) of ``head(hidden)`` against ``targets``: hidden [N, D], targets [N].

    Logits are made ``chunk_tokens`` rows at a time (default: LOGITS_BUDGET / vocab); under autograd
    each chunk is recomputed in backward instead of kept, so full [N, V] logits never exist.
    """
    return _chunked_sum(_nll_sum, (hidden, targets), head, chunk_tokens)


def chunked_kl(
    student: Tensor,
    teacher: Tensor,
    head: nn.Module,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    targets: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """Σ over positions of α·CE + (1−α)·T²·KL(p_teacher ‖ p_student), p = softmax(head(hidden) / T).

    student, teacher: hidden states [N, D] of the same N positions; the teacher's side is a constant
    (no gradient). α = 0 is pure distillation; α > 0 needs ``targets`` [N]. T² keeps the size of
    the gradient independent of the temperature (Hinton et al. 2015). Chunked like
    :func:`chunked_nll`: both models' logits exist for ``chunk_tokens`` positions at a time only.
    """
    if not 0 <= alpha <= 1 or temperature <= 0:
        raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got {alpha}, {temperature}")
    if alpha and targets is None:
        raise ValueError("alpha > 0 mixes in cross-entropy and needs targets")
    fn = partial(_distill_sum, alpha=alpha, temperature=temperature)
    return _chunked_sum(fn, (student, teacher.detach(), targets), head, chunk_tokens)


def _chunked_sum(fn: Callable[..., Tensor], rows: tuple[Tensor | None, ...], head: nn.Module, chunk_tokens: int | None) -> Tensor:
    """Σ of ``fn(*row_chunks, head)`` over chunks of the rows [N, ...]; under autograd each chunk is
    recomputed in backward (checkpointed) instead of keeping its logits."""
    chunk = chunk_tokens or max(1, LOGITS_BUDGET // head.weight.shape[0])
    n = rows[0].shape[0]
    need_grad = torch.is_grad_enabled() and (
        any(r is not None and r.requires_grad for r in rows) or any(p.requires_grad for p in head.parameters())
    )
    total = rows[0].new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        part = [None if r is None else r[s : s + chunk] for r in rows]
        if need_grad and n > chunk:
            total = total + grad_checkpoint(fn, *part, head, use_reentrant=False)
        else:
            total = total + fn(*part, head)
    return total


def _nll_sum(h: Tensor, t: Tensor, head: nn.Module) -> Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def _distill_sum(hs: Tensor, ht: Tensor, t: Tensor | None, head: nn.Module, alpha: float, temperature: float) -> Tensor:
    logits = head(hs).float()  # [n, V]
    total = alpha * F.cross_entropy(logits, t, reduction="sum") if alpha else logits.new_zeros(())
    if alpha < 1:
        with torch.no_grad():
            target = F.log_softmax(head(ht).float() / temperature, -1)
        kl = F.kl_div(F.log_softmax(logits / temperature, -1), target, log_target=True, reduction="sum")
        total = total + (1 - alpha) * temperature**2 * kl
    return total


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


def distill_loss(model: nn.Module, ids: Tensor, temperature: float = 1.0, alpha: float = 0.0) -> Tensor:
    """Mean over predicted positions of α·CE + (1−α)·T²·KL(original ‖ model) on ids [B, T].

    The teacher is the same model in :func:`linconv.teacher.teacher_mode` (softmax attention, no
    adapters, no gradient): one extra forward pass without backward, no second copy of the weights.
    Both passes stop at the last hidden state; the logits are made a chunk at a time from the head.
    """
    decoder, head = model_parts(model)
    with teacher_mode(model):
        teacher = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [B, T, D]
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    D = hidden.shape[-1]
    targets = ids[:, 1:].reshape(-1)
    total = chunked_kl(hidden[:, :-1].reshape(-1, D), teacher[:, :-1].reshape(-1, D), head, temperature, targets=targets, alpha=alpha)
    return total / targets.numel()
