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

Attention sinks (``sinks`` = s > 0): the first s tokens of the sequence stay visible to the local
score of every later group, as StreamingLLM keeps them beside its window, and leave the global sums
(they are counted once, locally). A group's first token then sees the sequence's start, as it does in
the original model, instead of only itself. Decoding keeps their keys/values once the first group
is finished (``sinks_on``).

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

from linconv.ops.linear import EPS, exclusive_cumsum, repeat_heads

FeatureMap = Callable[[Tensor], Tensor]
Score = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]  # (logits, mask) -> (weights, log-shift m or None)
YOSO_TAU = 8.0


class GroupState(NamedTuple):
    """The decoding state of grouped attention, a fixed size from the first token to the last.

    The buffer has room for the s sinks and a whole group at the key/value head count (grouped-query
    heads are repeated only where they are used). Until the first group is finished it holds that
    group from slot 0 on, so the first s tokens land in slots < s and stay there; after it, the
    current group sits from slot s on. ``fill`` says how many tokens the current group has. A decoding
    step writes its key/value into its slot in place and folds the group into S, z (in place) when
    it completes; the sequence forms return a new state of the same shapes.
    """

    S: Tensor  # [B, H, F, Dv] fp32: Σ φ(k) vᵀ over finished groups but the sinks (F = feature dim; 0 without φ)
    z: Tensor  # [B, H, F] fp32: Σ φ(k) over the same tokens
    k_buf: Tensor  # [B, Hkv, s+G, Dk] fp32: the sinks' keys (once held) and the current group's
    v_buf: Tensor  # [B, Hkv, s+G, Dv] fp32: their values
    sinks_on: Tensor  # [] bool: the first group is finished, so slots < s hold the sinks
    fill: int = 0  # tokens of the current group, 0 <= fill < G
    sinks: int = 0  # s: the first tokens of the sequence that every later group scores locally

    @property
    def held(self) -> bool:
        """Whether the sinks are held apart from the current group (reads the flag: not for compiled code)."""
        return bool(self.sinks) and bool(self.sinks_on)

    def keys(self) -> Tensor:
        """The current group's keys [B, Hkv, fill, Dk] (a view)."""
        start = self.sinks if self.held else 0
        return self.k_buf[:, :, start : start + self.fill]

    def values(self) -> Tensor:
        start = self.sinks if self.held else 0
        return self.v_buf[:, :, start : start + self.fill]

    def sink_keys(self) -> Tensor:
        """The held sinks' keys [B, Hkv, s, Dk] (none before the first group is finished)."""
        return self.k_buf[:, :, : self.sinks if self.held else 0]

    def sink_values(self) -> Tensor:
        return self.v_buf[:, :, : self.sinks if self.held else 0]


def empty_group_state(q: Tensor, k: Tensor, v: Tensor, phi: FeatureMap | None, group_size: int, sinks: int = 0) -> GroupState:
    """The state before any token, for q [B, H, *, Dk], k [B, Hkv, *, Dk] and v [B, Hkv, *, Dv]."""
    B, H, Hkv, Dk, Dv = q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    F = phi(q[:, :, :0].float()).shape[-1] if phi is not None else 0
    zeros = lambda *s: q.new_zeros(*s, dtype=torch.float32)
    L = sinks + group_size
    return GroupState(
        zeros(B, H, F, Dv), zeros(B, H, F), zeros(B, Hkv, L, Dk), zeros(B, Hkv, L, Dv), q.new_zeros((), dtype=torch.bool), 0, sinks
    )


def _global_weight(sinks: int, positions: int, device, from_first_token: bool) -> Tensor | None:
    """[positions] fp32: 1 for each position that joins the global sums, 0 for the sinks among them,
    which are the first s positions when ``from_first_token`` (they start at the sequence's first token).
    None when all join."""
    if not sinks or not from_first_token:
        return None
    return (torch.arange(positions, device=device) >= sinks).float()


def _sink_kv(state: GroupState, k_all: Tensor, v_all: Tensor) -> tuple[Tensor, Tensor]:
    """The sinks' keys/values [B, Hkv, s, D]: held by the state, or else the first s of ``k_all``,
    ``v_all`` (the buffer followed by a segment, which then start at the first token)."""
    if state.held:
        return state.sink_keys(), state.sink_values()
    first = lambda x: torch.nn.functional.pad(x[:, :, : state.sinks], (0, 0, 0, max(0, state.sinks - x.shape[2])))
    return first(k_all), first(v_all)


def _after(state: GroupState, S: Tensor, z: Tensor, k_all: Tensor, v_all: Tensor, done: int, group_size: int) -> GroupState:
    """The state whose finished groups are summed in S, z and whose buffer holds ``k_all``, ``v_all``
    [B, Hkv, L, D] from position ``done`` on; the sinks are held from the first finished group on."""
    s = state.sinks
    held = state.held or bool(s and done)
    pad = lambda x, n: torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))
    k_rest, v_rest = k_all[:, :, done:], v_all[:, :, done:]
    if held:
        ks, vs = _sink_kv(state, k_all, v_all)
        k_buf, v_buf = torch.cat([ks, pad(k_rest, group_size)], 2), torch.cat([vs, pad(v_rest, group_size)], 2)
    else:
        k_buf, v_buf = pad(k_rest, s + group_size), pad(v_rest, s + group_size)
    return GroupState(S, z, k_buf, v_buf, torch.full_like(state.sinks_on, held), k_all.shape[2] - done, s)


def softmax_score(logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """exp(l − m), m the row maximum of the visible logits (each query sees at least its own key)."""
    masked = logits if mask is None else torch.where(mask, logits, float("-inf"))
    m = masked.amax(-1, keepdim=True).detach()
    return torch.exp(masked - m), m


def _unshifted(w: Tensor, mask: Tensor | None) -> tuple[Tensor, None]:
    """Weights of a score that needs no shift: zero where masked, m None."""
    return (w if mask is None else torch.where(mask, w, 0.0)), None


def relu2_score(logits: Tensor, mask: Tensor | None) -> tuple[Tensor, None]:
    """relu(l)²: the paper's local score (for unit q, k)."""
    return _unshifted(torch.relu(logits).square(), mask)


def yoso_score(logits: Tensor, mask: Tensor | None) -> tuple[Tensor, None]:
    """(1 − arccos(l)/π)^τ: YOSO's expected LSH-Bernoulli collision probability (for unit q, k)."""
    return _unshifted((1.0 - torch.arccos(logits.clamp(-1 + 1e-6, 1 - 1e-6)) / math.pi).pow(YOSO_TAU), mask)


SCORES: dict[str, Score] = {"relu2": relu2_score, "softmax": softmax_score, "yoso": yoso_score}


def local_weights(logits: Tensor, mask: Tensor | None, score: str) -> tuple[Tensor, Tensor | None]:
    """Weights of the registered score ``score`` (zero where ``mask`` is False) and their log-shift m.

    ``logits``: [..., Tq, Tk]; ``mask``: broadcastable bool, True for every key a query sees (each
    query sees at least its own key), or None when it sees them all. m [..., Tq, 1] is None except
    for softmax, whose weights are exp(l − m) with m the row maximum; the global term must then be
    scaled by exp(−m) (:func:`global_scale`).
    """
    return SCORES[score](logits, mask)


def global_scale(alpha: Tensor | float, m: Tensor | None) -> Tensor | float:
    """The weight of the global term beside local weights that carry the shift ``m``: α·exp(−m)."""
    return alpha if m is None else alpha * torch.exp(-m)


def _group_sums(k: Tensor, v: Tensor, heads: int, phi: FeatureMap, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """Σ w φ(k) vᵀ [B, H, F, Dv] and Σ w φ(k) [B, H, F] over finished groups' keys/values [B, Hkv, L, D]
    with the per-position weights w [L] of :func:`_global_weight` (None: all 1)."""
    kf = phi(repeat_heads(k, heads))
    kf = kf if weight is None else kf * weight.unsqueeze(-1)
    return kf.transpose(-1, -2) @ repeat_heads(v, heads), kf.sum(2)


def _fold_weight(k_buf: Tensor, sinks_on: Tensor, sinks: int | Tensor, group_size: int) -> Tensor:
    """[s+G] fp32: the buffer slots of a finished group that join S, z: the first group but its sinks
    (slots < s), a later group from slot s on."""
    slots = torch.arange(k_buf.shape[2], device=k_buf.device)
    return ((slots >= sinks) & (sinks_on | (slots < group_size))).float()


def advance_group(state: GroupState, k: Tensor, v: Tensor, group_size: int, phi: FeatureMap | None) -> GroupState:
    """The state after also seeing ``k`` [B, Hkv, T, Dk], ``v`` [B, Hkv, T, Dv] (no outputs)."""
    k_all = torch.cat([state.keys(), k.float()], 2)
    v_all = torch.cat([state.values(), v.float()], 2)
    done = k_all.shape[2] // group_size * group_size
    S, z = state.S, state.z
    if done and phi is not None:
        weight = _global_weight(state.sinks, done, k.device, not state.held)
        kv, kz = _group_sums(k_all[:, :, :done], v_all[:, :, :done], S.shape[1], phi, weight)
        S, z = S + kv, z + kz
    return _after(state, S, z, k_all, v_all, done, group_size)


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
    sinks: int = 0,
) -> tuple[Tensor, GroupState]:
    """Grouped attention over a segment that continues ``state``; also the decoding step (T = 1).

    q [B, H, T, Dk]; k [B, Hkv, T, Dk], v [B, Hkv, T, Dv] with H a multiple of Hkv (grouped-query
    heads). The buffered keys/values of the unfinished group are prepended so groups stay aligned
    to the absolute position. Returns the output [B, H, T, Dv] in ``v``'s dtype and the new state
    (T = 1: the given state, updated in place; see :func:`grouped_step`). ``sinks`` is read only
    when ``state`` is None; a state knows its own.
    """
    if state is None:
        state = empty_group_state(q, k, v, phi, group_size, sinks)
    if q.shape[2] == 1:
        return grouped_step(q, k, v, state, group_size=group_size, score=score, phi=phi, alpha=alpha)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    G = group_size
    b = state.fill
    k_all = torch.cat([state.keys(), k.float()], 2)  # [B, Hkv, b+T, Dk]
    v_all = torch.cat([state.values(), v.float()], 2)
    q_all = torch.cat([q.new_zeros(B, H, b, Dk, dtype=torch.float32), q.float()], 2)
    L = b + T
    n = -(-L // G)
    pad = n * G - L
    qg, kg, vg = (
        torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, n, G, x.shape[-1])
        for x in (q_all, repeat_heads(k_all, H), repeat_heads(v_all, H))
    )

    causal = torch.ones(G, G, dtype=torch.bool, device=q.device).tril()
    s = state.sinks
    if s:  # every group but the first sees the sinks: s more columns in front of each group's keys
        ks, vs = (repeat_heads(x, H).unsqueeze(2) for x in _sink_kv(state, k_all, v_all))  # [B, H, 1, s, D]
        seen = ((torch.arange(n, device=q.device) > 0) | state.held).view(n, 1, 1).expand(n, G, s)
        logits = torch.cat([qg @ ks.transpose(-1, -2), qg @ kg.transpose(-1, -2)], -1)  # [B, H, n, G, s+G]
        w, m = local_weights(logits, torch.cat([seen, causal.expand(n, G, G)], -1), score)
        num = w[..., :s] @ vs + w[..., s:] @ vg
    else:
        w, m = local_weights(qg @ kg.transpose(-1, -2), causal, score)  # [B, H, n, G, G], [B, H, n, G, 1]
        num = w @ vg
    den = w.sum(-1, keepdim=True)
    done = L // G  # groups finished by the end of this segment
    S, z = state.S, state.z
    if phi is not None:
        qf, kf = phi(qg), phi(kg)  # [B, H, n, G, F]
        weight = _global_weight(s, n * G, q.device, not state.held)
        kf = kf if weight is None else kf * weight.view(n, G, 1)
        kv = kf.transpose(-1, -2) @ vg  # [B, H, n, F, Dv]
        kz = kf.sum(3)  # [B, H, n, F]
        S_before = S.unsqueeze(2) + exclusive_cumsum(kv)
        z_before = z.unsqueeze(2) + exclusive_cumsum(kz)
        scale = global_scale(alpha, m)
        num = num + scale * (qf @ S_before)
        den = den + scale * (qf * z_before.unsqueeze(3)).sum(-1, keepdim=True)
        S, z = S + kv[:, :, :done].sum(2), z + kz[:, :, :done].sum(2)
    out = (num / (den + EPS)).reshape(B, H, n * G, Dv)[:, :, b:L]
    return out.to(v.dtype), _after(state, S, z, k_all, v_all, done * G, G)


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
    """One decoding step (q [B, H, 1, Dk], k, v [B, Hkv, 1, D]) of :func:`grouped_attention`, in O(G)
    work and in place: returns the output and ``state`` with its tensors updated.

    The key/value go into slot ``fill`` of the buffers; the query scores the slots up to its own
    (later slots hold stale keys of an earlier group) and reads the global state directly. When the
    group completes, S and z absorb the buffer in place. Query heads are grouped by their key/value
    head: nothing is repeated.
    """
    B, H, _, Dk = q.shape
    Hkv, Dv, n, s = k.shape[1], v.shape[-1], state.fill, state.sinks
    slot = torch.full((1,), n, dtype=torch.long, device=q.device)  # (a tensor index: torch.compile keeps n symbolic)
    mask = None
    if s:  # the sinks in slots < s, seen once the first group is finished; until then that group starts at slot 0
        last = slot == group_size - 1
        slot = slot + s * state.sinks_on.long()
        mask = torch.arange(s + n + 1, device=q.device) <= slot  # the sinks (once held) and the group so far
    state.k_buf.index_copy_(2, slot, k.float())
    state.v_buf.index_copy_(2, slot, v.float())
    q32 = q.float()
    keys, values = state.k_buf[:, :, : s + n + 1], state.v_buf[:, :, : s + n + 1]  # views: nothing is copied
    w, m = local_weights(q32.view(B, Hkv, H // Hkv, Dk) @ keys.transpose(-1, -2), mask, score)  # [B, Hkv, rep, s+n+1]
    num = (w @ values).view(B, H, 1, Dv)
    den = w.sum(-1).view(B, H, 1, 1)
    if phi is not None:
        qf = phi(q32)  # [B, H, 1, F]
        scale = global_scale(alpha, None if m is None else m.view(B, H, 1, 1))
        num = num + scale * (qf @ state.S)
        den = den + scale * (qf @ state.z.unsqueeze(-1))
    if phi is not None and torch.compiler.is_compiling():  # one graph for every position: the fold is a branch in it
        # (the branch reads only its operands: the sink count goes in as a tensor, not as a size)
        fold = lambda k_buf, v_buf, on, sinks: _group_sums(k_buf, v_buf, H, phi, _fold_weight(k_buf, on, sinks, group_size))
        keep = lambda k_buf, v_buf, on, sinks: (state.S.new_zeros(state.S.shape), state.z.new_zeros(state.z.shape))
        operands = (state.k_buf, state.v_buf, state.sinks_on, torch.full((), s, device=q.device))
        kv, kz = torch.cond(n + 1 == group_size, fold, keep, operands)
        state.S.add_(kv)
        state.z.add_(kz)
    elif phi is not None and n + 1 == group_size:  # the group is complete: S, z absorb it
        kv, kz = _group_sums(state.k_buf, state.v_buf, H, phi, _fold_weight(state.k_buf, state.sinks_on, s, group_size) if s else None)
        state.S.add_(kv)
        state.z.add_(kz)
    if s:  # a finished first group leaves its first s tokens in slots < s: the sinks are held from now on
        state.sinks_on.logical_or_(last[0])
    return (num / (den + EPS)).to(v.dtype), state._replace(fill=(n + 1) % group_size)
