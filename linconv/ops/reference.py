"""Slow, obviously-correct forms of every op, written straight from the formulas. Tests only.

Each is a plain fp32 loop or a full quadratic mask, shares no code with the fast forms (not even
the local score functions, written again here), and takes the same explicit states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from linconv.ops.linear import EPS, LinearState
from linconv.ops.local import YOSO_TAU, FeatureMap, GroupState


def linear_quadratic(q: Tensor, k: Tensor, v: Tensor, state: LinearState, normalize: bool) -> Tensor:
    """(φ(Q) φ(K)ᵀ ⊙ M_causal) V plus the prefix held in ``state``."""
    q, k, v = q.float(), k.float(), v.float()
    T = q.shape[2]
    A = (q @ k.transpose(-1, -2)) * torch.ones(T, T).tril()
    out = A @ v + q @ state.S
    if normalize:
        out = out / (A.sum(-1, keepdim=True) + q @ state.z.unsqueeze(-1) + EPS)
    return out


def linear_loop(q: Tensor, k: Tensor, v: Tensor, state: LinearState, normalize: bool) -> tuple[Tensor, LinearState]:
    """One token at a time: S += k vᵀ, z += k, o = qᵀS / qᵀz."""
    S, z = state.S.clone(), None if state.z is None else state.z.clone()
    outs = []
    for t in range(q.shape[2]):
        qt, kt, vt = q[:, :, t].float(), k[:, :, t].float(), v[:, :, t].float()
        S = S + torch.einsum("bhk,bhv->bhkv", kt, vt)
        o = torch.einsum("bhk,bhkv->bhv", qt, S)
        if normalize:
            z = z + kt
            o = o / (torch.einsum("bhk,bhk->bh", qt, z).unsqueeze(-1) + EPS)
        outs.append(o)
    return torch.stack(outs, 2), LinearState(S, z)


def kv_heads(num_heads: int, num_kv_heads: int) -> list[int]:
    """The key/value head that each query head reads (grouped-query attention)."""
    return [h * num_kv_heads // num_heads for h in range(num_heads)]


def score_weights(logits: Tensor, score: str) -> tuple[Tensor, Tensor]:
    """Weights of one query's local keys from their logits l = q·k [..., n], and the shift m [..., 1]
    that they carry: relu² = max(l, 0)², yoso = (1 − arccos(l)/π)^τ, softmax = exp(l − max l)."""
    m = torch.zeros_like(logits[..., :1])
    if score == "relu2":
        return torch.where(logits > 0, logits * logits, torch.zeros_like(logits)), m
    if score == "yoso":
        angle = torch.arccos(torch.clamp(logits, -1 + 1e-6, 1 - 1e-6))  # unit q, k: l = cos(angle)
        return (1 - angle / math.pi) ** YOSO_TAU, m
    if score == "softmax":
        m = logits.max(-1, keepdim=True).values
        return torch.exp(logits - m), m
    raise ValueError(f"no reference score {score!r}")


def grouped_loop(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: GroupState,
    *,
    group_size: int,
    score: str,
    phi: FeatureMap | None,
    alpha: float | Tensor = 1.0,
) -> tuple[Tensor, GroupState]:
    """Per query: local keys of its group (buffer included) and the sinks, global keys of earlier groups.

    k, v and the state's buffers may have fewer heads than q (grouped-query attention). The sinks
    are the first s tokens: held by the state once the first group is finished; before that the
    buffer starts at the first token and they are its first s keys, which never join S, z."""
    G = group_size
    B, H, Hkv = q.shape[0], q.shape[1], k.shape[1]
    s, held = state.sinks, state.held
    own_keys = torch.cat([state.keys(), k.float()], 2)  # [B, Hkv, L, Dk]
    own_vals = torch.cat([state.values(), v.float()], 2)
    keys, vals = own_keys[:, kv_heads(H, Hkv)], own_vals[:, kv_heads(H, Hkv)]
    sink_keys = state.sink_keys()[:, kv_heads(H, Hkv)] if held else keys[:, :, :s]
    sink_vals = state.sink_values()[:, kv_heads(H, Hkv)] if held else vals[:, :, :s]
    first = 0 if held else s  # buffered positions before this one are sinks, not global keys
    b = state.fill
    outs = []
    for t in range(q.shape[2]):
        p = b + t  # position relative to the start of the buffered group
        start = p // G * G
        qt = q[:, :, t : t + 1].float()
        local_k, local_v = keys[:, :, start : p + 1], vals[:, :, start : p + 1]
        if s and (held or start > 0):
            local_k, local_v = torch.cat([sink_keys, local_k], 2), torch.cat([sink_vals, local_v], 2)
        w, m = score_weights(qt @ local_k.transpose(-1, -2), score)
        num, den = w @ local_v, w.sum(-1, keepdim=True)
        if phi is not None:
            gk, gv = keys[:, :, min(first, start) : start], vals[:, :, min(first, start) : start]
            S = state.S + phi(gk).transpose(-1, -2) @ gv
            z = state.z + phi(gk).sum(2)
            scale = alpha if m is None else alpha * torch.exp(-m)
            num = num + scale * (phi(qt) @ S)
            den = den + scale * (phi(qt) @ z.unsqueeze(-1))
        outs.append((num / (den + EPS))[:, :, 0])
    L = keys.shape[2]
    done = L // G * G
    S, z = state.S, state.z
    if phi is not None and done:
        gk, gv = keys[:, :, min(first, done) : done], vals[:, :, min(first, done) : done]
        S = S + phi(gk).transpose(-1, -2) @ gv
        z = z + phi(gk).sum(2)
    now_held = held or (s > 0 and done > 0)
    k_buf = torch.zeros(B, Hkv, s + G, k.shape[-1])  # the sinks in slots < s once held, the group after them
    v_buf = torch.zeros(B, Hkv, s + G, v.shape[-1])
    at = s if now_held else 0
    k_buf[:, :, at : at + L - done], v_buf[:, :, at : at + L - done] = own_keys[:, :, done:], own_vals[:, :, done:]
    if now_held:
        k_buf[:, :, :s] = state.sink_keys() if held else own_keys[:, :, :s]
        v_buf[:, :, :s] = state.sink_values() if held else own_vals[:, :, :s]
    return torch.stack(outs, 2), GroupState(S, z, k_buf, v_buf, torch.tensor(now_held), L - done, s)


def conv_loop(v: Tensor, weight: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    """y_t = Σ_j w[h, j] v_{t−j}, reading the tail before the first token; value head h // (H // Hkv)."""
    H, K = weight.shape
    x = torch.cat([tail, v.float()], 2)
    B, Hkv, T, D = v.shape
    y = torch.zeros(B, H, T, D)
    for h, g in enumerate(kv_heads(H, Hkv)):
        for t in range(T):
            for j in range(K):
                y[:, h, t] += weight[h, j].float() * x[:, g, K - 1 + t - j]
    return y, x[:, :, x.shape[2] - (K - 1) :]


def tree_paths(parents: Sequence[int]) -> list[list[int]]:
    """Root-to-node path (node indices) of every node."""
    paths: list[list[int]] = []
    for p in parents:
        paths.append((paths[p] if p >= 0 else []) + [len(paths)])
    return paths


def replay_tree(parents: Sequence[int], run_path) -> Tensor:
    """Per-path sequential replay: ``run_path(path)`` decodes the path from the committed state and
    returns outputs [B, H, len(path), D]; each node takes the output at its own (last) position."""
    return torch.stack([run_path(path)[:, :, -1] for path in tree_paths(parents)], 2)
