"""Grouped attention: the paper's local/global split, with explicit state.

Positions are cut into non-overlapping groups of G tokens, counted from the first token. A query
attends *locally* to the earlier tokens of its own group through a quadratic score and *globally*
to every token of earlier groups through the linear state:

    num_t = Σ_{i∈grp(t), i≤t} s(q_t, k_i) v_i  +  α · φ(q_t)ᵀ S_{grp(t)}
    den_t = Σ_{i∈grp(t), i≤t} s(q_t, k_i)      +  α · φ(q_t)ᵀ z_{grp(t)}
    o_t   = num_t / (den_t + eps)

``S_g, z_g`` hold φ(k) vᵀ and φ(k) summed over all groups before g, so the global state changes only
at group boundaries; decoding keeps it plus the keys/values of the current, unfinished group.
Without φ (``phi=None``) there is no global part: plain block-local attention.

Scores are registered by name in ``SCORES`` and take raw logits ``l = q·k`` (the caller scales or
normalises q, k). Softmax is stabilised by the row maximum m of its local logits, with the global
term scaled by exp(−m) too, which is exact.

Layout: q, k [B, H, T, Dk], v [B, H, T, Dv].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from linconv.ops.linear import EPS, exclusive_cumsum

FeatureMap = Callable[[Tensor], Tensor]
Score = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (logits, mask) -> (weights, log-shift m)
YOSO_TAU = 8.0


class GroupState(NamedTuple):
    S: Tensor  # [B, H, F, Dv] fp32: Σ φ(k) vᵀ over finished groups (F = feature dim; 0 without φ)
    z: Tensor  # [B, H, F] fp32: Σ φ(k) over finished groups
    k_buf: Tensor  # [B, H, b, Dk] fp32: keys of the current group, b < G
    v_buf: Tensor  # [B, H, b, Dv] fp32: values of the current group


def empty_group_state(q: Tensor, v: Tensor, phi: FeatureMap | None) -> GroupState:
    """The state before any token, for q [B, H, *, Dk] and v [B, H, *, Dv]."""
    B, H, Dk, Dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    F = phi(q[:, :, :0].float()).shape[-1] if phi is not None else 0
    zeros = lambda *s: q.new_zeros(*s, dtype=torch.float32)
    return GroupState(zeros(B, H, F, Dv), zeros(B, H, F), zeros(B, H, 0, Dk), zeros(B, H, 0, Dv))


def softmax_score(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """exp(l − m), m the row maximum of the visible logits (0 for a row that sees nothing)."""
    masked = logits.masked_fill(~mask, float("-inf"))
    m = masked.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.exp(masked - m), m


def _unshifted(w: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Weights of a score that needs no shift: masked to zero, m = 0."""
    return w.masked_fill(~mask, 0.0), torch.zeros_like(w[..., :1])


def relu2_score(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """relu(l)²: the paper's local score (for unit q, k)."""
    return _unshifted(torch.relu(logits).square(), mask)


def yoso_score(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(1 − arccos(l)/π)^τ: YOSO's expected LSH-Bernoulli collision probability (for unit q, k)."""
    return _unshifted((1.0 - torch.arccos(logits.clamp(-1 + 1e-6, 1 - 1e-6)) / math.pi).pow(YOSO_TAU), mask)


SCORES: dict[str, Score] = {"relu2": relu2_score, "softmax": softmax_score, "yoso": yoso_score}


def local_weights(logits: Tensor, mask: Tensor, score: str) -> tuple[Tensor, Tensor]:
    """Weights of the registered score ``score`` (zero where ``mask`` is False) and their log-shift m.

    ``logits``: [..., Tq, Tk]; ``mask``: broadcastable bool. m [..., Tq, 1] is zero except for
    softmax, whose weights are exp(l − m); the global term must then be scaled by exp(−m).
    """
    return SCORES[score](logits, mask)


def advance_group(state: GroupState, k: Tensor, v: Tensor, group_size: int, phi: FeatureMap | None) -> GroupState:
    """The state after also seeing ``k`` [B, H, T, Dk], ``v`` [B, H, T, Dv] (no outputs)."""
    k_all = torch.cat([state.k_buf, k.float()], 2)
    v_all = torch.cat([state.v_buf, v.float()], 2)
    done = k_all.shape[2] // group_size * group_size
    S, z = state.S, state.z
    if done and phi is not None:
        kf = phi(k_all[:, :, :done])
        S = S + kf.transpose(-1, -2) @ v_all[:, :, :done]
        z = z + kf.sum(2)
    return GroupState(S, z, k_all[:, :, done:], v_all[:, :, done:])


def grouped_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: GroupState | None = None,
    *,
    group_size: int,
    score: str,
    phi: FeatureMap | None = None,
    alpha: Tensor | float = 1.0,
) -> tuple[Tensor, GroupState]:
    """Grouped attention over a segment that continues ``state``; also the decoding step (T = 1).

    The buffered keys/values of the unfinished group are prepended so groups stay aligned to the
    absolute position. Returns the output [B, H, T, Dv] in ``v``'s dtype and the new state.
    """
    if state is None:
        state = empty_group_state(q, v, phi)
    if q.shape[2] == 1:
        return grouped_step(q, k, v, state, group_size=group_size, score=score, phi=phi, alpha=alpha)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    G = group_size
    b = state.k_buf.shape[2]
    k_all = torch.cat([state.k_buf, k.float()], 2)
    v_all = torch.cat([state.v_buf, v.float()], 2)
    q_all = torch.cat([q.new_zeros(B, H, b, Dk, dtype=torch.float32), q.float()], 2)
    L = b + T
    n = -(-L // G)
    pad = n * G - L
    qg, kg, vg = (torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, n, G, x.shape[-1]) for x in (q_all, k_all, v_all))

    causal = torch.ones(G, G, dtype=torch.bool, device=q.device).tril()
    w, m = local_weights(qg @ kg.transpose(-1, -2), causal, score)  # [B, H, n, G, G], [B, H, n, G, 1]
    num = w @ vg
    den = w.sum(-1, keepdim=True)
    done = L // G  # groups finished by the end of this segment
    S, z = state.S, state.z
    if phi is not None:
        qf, kf = phi(qg), phi(kg)  # [B, H, n, G, F]
        kv = kf.transpose(-1, -2) @ vg  # [B, H, n, F, Dv]
        kz = kf.sum(3)  # [B, H, n, F]
        S_before = S.unsqueeze(2) + exclusive_cumsum(kv)
        z_before = z.unsqueeze(2) + exclusive_cumsum(kz)
        scale = alpha * torch.exp(-m)
        num = num + scale * (qf @ S_before)
        den = den + scale * (qf * z_before.unsqueeze(3)).sum(-1, keepdim=True)
        S, z = S + kv[:, :, :done].sum(2), z + kz[:, :, :done].sum(2)
    out = (num / (den + EPS)).reshape(B, H, n * G, Dv)[:, :, b:L]
    new_state = GroupState(S, z, k_all[:, :, done * G :], v_all[:, :, done * G :])
    return out.to(v.dtype), new_state


def grouped_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: GroupState,
    *,
    group_size: int,
    score: str,
    phi: FeatureMap | None = None,
    alpha: Tensor | float = 1.0,
) -> tuple[Tensor, GroupState]:
    """One decoding step (q, k, v [B, H, 1, D]) of :func:`grouped_attention`, in O(G) work.

    The query scores only the buffered keys of its group and itself, and reads the global state
    directly; S, z absorb the buffer when the group fills. (The sequence form would pad the query
    to a whole G x G group and recompute the group's φ(k)ᵀv every step.)
    """
    q32 = q.float()
    k_all = torch.cat([state.k_buf, k.float()], 2)  # [B, H, b+1, Dk]
    v_all = torch.cat([state.v_buf, v.float()], 2)
    everything = torch.ones((), dtype=torch.bool, device=q.device)  # every buffered key is in the past
    w, m = local_weights(q32 @ k_all.transpose(-1, -2), everything, score)  # [B, H, 1, b+1], [B, H, 1, 1]
    num = w @ v_all
    den = w.sum(-1, keepdim=True)
    if phi is not None:
        qf = phi(q32)  # [B, H, 1, F]
        scale = alpha * torch.exp(-m)
        num = num + scale * (qf @ state.S)
        den = den + scale * (qf * state.z.unsqueeze(2)).sum(-1, keepdim=True)
    return (num / (den + EPS)).to(v.dtype), advance_group(state, k, v, group_size, phi)
