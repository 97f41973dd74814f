"""Kernelized causal linear attention with explicit state.

Layout: ``q, k``: [B, H, T, Dk], already passed through the feature map (φ(q), φ(k));
``v``: [B, H, T, Dv] (the caller repeats grouped-query keys/values: φ may differ per head). The
state after tokens 1..t is ``S_t = Σ_{i≤t} k_i v_iᵀ`` [B, H, Dk, Dv] and ``z_t = Σ_{i≤t} k_i``
[B, H, Dk] (``z`` is None without a denominator). States are fp32 whatever the input dtype: the
un-normalised sums grow with T.

With a denominator ``o_t = qₜᵀ S_t / (qₜᵀ z_t + eps)``; without one ``o_t = qₜᵀ S_t`` (the caller
normalises the output, as TransNormer does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

EPS = 1e-6


class LinearState(NamedTuple):
    S: Tensor  # [B, H, Dk, Dv] fp32
    z: Tensor | None  # [B, H, Dk] fp32, None without a denominator


def repeat_heads(x: Tensor, heads: int) -> Tensor:
    """Grouped-query attention: x [B, Hkv, ...] -> [B, heads, ...], each key/value head repeated for
    its ``heads // Hkv`` query heads (head h reads kv head h // rep). Used where a computation needs
    one key per query head; states keep the Hkv heads only."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], 1)


def exclusive_cumsum(x: Tensor) -> Tensor:
    """Sum of the chunks before each chunk along dim 2: [B, H, n, ...] -> [B, H, n, ...]."""
    return torch.nn.functional.pad(x.cumsum(2), (0, 0) * (x.dim() - 3) + (1, 0))[:, :, :-1]


def empty_linear_state(q: Tensor, v: Tensor, normalize: bool) -> LinearState:
    """The state before any token, shaped for ``q`` [B, H, *, Dk] and ``v`` [B, H, *, Dv]."""
    B, H, Dk, Dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    S = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32)
    return LinearState(S, q.new_zeros(B, H, Dk, dtype=torch.float32) if normalize else None)


def advance_linear(state: LinearState, k: Tensor, v: Tensor) -> LinearState:
    """The state after also seeing ``k`` [B, H, T, Dk], ``v`` [B, H, T, Dv] (no outputs)."""
    k, v = k.float(), v.float()
    S = state.S + k.transpose(-1, -2) @ v
    return LinearState(S, None if state.z is None else state.z + k.sum(-2))


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: LinearState | None = None,
    *,
    normalize: bool = True,
    chunk_size: int = 128,
) -> tuple[Tensor, LinearState]:
    """Chunked causal linear attention: quadratic inside chunks of ``chunk_size``, state across.

    O(T·C) time and O(T·C + T/C·Dk·Dv) memory. Returns the output [B, H, T, Dv] in ``v``'s dtype
    and the state after the last token.
    """
    if state is None:
        state = empty_linear_state(q, v, normalize)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = max(1, min(chunk_size, T))
    n = -(-T // C)
    pad = n * C - T
    qf, kf, vf = (torch.nn.functional.pad(x.float(), (0, 0, 0, pad)) for x in (q, k, v))
    qc, kc, vc = (x.view(B, H, n, C, x.shape[-1]) for x in (qf, kf, vf))

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, n, C, C]
    kv = kc.transpose(-1, -2) @ vc  # [B, H, n, Dk, Dv]
    S_before = state.S.unsqueeze(2) + exclusive_cumsum(kv)  # state at the start of each chunk
    out = scores @ vc + qc @ S_before  # [B, H, n, C, Dv]
    S = state.S + kv.sum(2)
    z = None
    if normalize:
        kz = kc.sum(3)  # [B, H, n, Dk]
        z_before = state.z.unsqueeze(2) + exclusive_cumsum(kz)
        den = scores.sum(-1) + (qc * z_before.unsqueeze(3)).sum(-1)
        out = out / (den.unsqueeze(-1) + EPS)
        z = state.z + kz.sum(2)
    out = out.reshape(B, H, n * C, Dv)[:, :, :T]
    return out.to(v.dtype), LinearState(S, z)


def linear_attention_step(q: Tensor, k: Tensor, v: Tensor, state: LinearState) -> tuple[Tensor, LinearState]:
    """One recurrent decoding step: ``q, k`` [B, H, Dk], ``v`` [B, H, Dv] -> output [B, H, Dv].

    S and z are updated in place (the decoding state keeps its storage); the state is returned.
    """
    kf, vf, qf = k.float(), v.float(), q.float()
    S = state.S
    S.view(-1, *S.shape[-2:]).baddbmm_(kf.reshape(-1, kf.shape[-1], 1), vf.reshape(-1, 1, vf.shape[-1]))  # S += k vᵀ
    out = (qf.unsqueeze(-2) @ S).squeeze(-2)
    if state.z is not None:
        state.z.add_(kf)
        out = out / ((qf * state.z).sum(-1, keepdim=True) + EPS)
    return out.to(v.dtype), state
