"""Tree forms: every node of a candidate tree as if its root-to-node path had been decoded alone.

A tree of N nodes is given by ``parents`` (length N, parent index or −1 for a child of the
committed prefix, parents before children). Node n sits at depth d_n ≥ 1, i.e. at position
p0 + d_n − 1 where p0 tokens are committed. q is [B, H, N, D]; k, v are [B, H, N, D] for the
linear form and [B, Hkv, N, D] (grouped-query heads) for the grouped and conv forms; states are those of the
sequence forms and are not changed: advancing along the accepted path is the caller's
``advance_*`` on the accepted nodes' keys/values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from linconv.ops.linear import EPS, LinearState, repeat_heads
from linconv.ops.local import FeatureMap, GroupState, global_scale, local_weights


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node, 1 for children of the committed prefix."""
    depth: list[int] = []
    for n, p in enumerate(parents):
        if not -1 <= p < n:
            raise ValueError(f"tree node {n} has parent {p}: parents must come before their children")
        depth.append(1 if p < 0 else depth[p] + 1)
    return depth


def ancestor_mask(parents: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """[N, N] bool: entry (n, a) is True when a is n or one of its ancestors."""
    N = len(parents)
    tree_depths(parents)  # validates
    mask = torch.eye(N, dtype=torch.bool)
    for n, p in enumerate(parents):
        if p >= 0:
            mask[n] |= mask[p]
    return mask.to(device)


def linear_tree(q: Tensor, k: Tensor, v: Tensor, parents: Sequence[int], state: LinearState) -> Tensor:
    """Kernelized linear attention over a tree: prefix from the state, tree part masked by ancestry.

    q, k are feature-mapped as in ``linear_attention``. Returns [B, H, N, Dv] in v's dtype.
    """
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = (qf @ kf.transpose(-1, -2)).masked_fill(~ancestor_mask(parents, q.device), 0.0)
    out = scores @ vf + qf @ state.S
    if state.z is not None:
        den = scores.sum(-1) + (qf * state.z.unsqueeze(2)).sum(-1)
        out = out / (den.unsqueeze(-1) + EPS)
    return out.to(v.dtype)


def grouped_tree(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    parents: Sequence[int],
    state: GroupState,
    *,
    group_size: int,
    score: str,
    phi: FeatureMap | None = None,
    alpha: Tensor | float = 1.0,
) -> Tensor:
    """Grouped attention over a tree, exact when paths cross a group boundary.

    Keys are the held sinks, the buffered keys of the current group and the tree nodes. A visible
    key (a held sink once the first group is finished, the buffer, or an ancestor-or-self) in the
    query node's group or among the sinks is scored locally; one in an earlier group joins the
    global linear part on top of the state. Returns [B, H, N, Dv] in v's dtype.
    """
    G = group_size
    b, s, held = state.fill, state.sinks, state.held
    H, N = q.shape[1], q.shape[2]
    dev = q.device
    depth = torch.tensor(tree_depths(parents), device=dev)
    node_group = (b + depth - 1) // G  # group of each node, relative to the current one
    # columns: the held sinks (an earlier group, yet scored locally), the buffered group, the nodes
    h = s if held else 0
    key_group = torch.cat([torch.full((h,), -1, device=dev), torch.zeros(b, dtype=torch.long, device=dev), node_group])
    visible = torch.cat([torch.ones(N, h + b, dtype=torch.bool, device=dev), ancestor_mask(parents, dev)], 1)
    same = key_group.unsqueeze(0) == node_group.unsqueeze(1)  # [N, h+b+N]
    # before the first group is finished the buffer starts at the first token: its first s are the sinks
    position = torch.cat([torch.arange(b, device=dev), b + depth - 1])
    sink = torch.cat([torch.ones(h, dtype=torch.bool, device=dev), (position < s) & (not held)])
    local_mask, global_mask = visible & (same | sink), visible & ~same & ~sink

    qf32 = q.float()
    keys = repeat_heads(torch.cat([state.sink_keys(), state.keys(), k.float()], 2), H)
    vals = repeat_heads(torch.cat([state.sink_values(), state.values(), v.float()], 2), H)
    w, m = local_weights(qf32 @ keys.transpose(-1, -2), local_mask, score)
    num = w @ vals
    den = w.sum(-1, keepdim=True)
    if phi is not None:
        qphi = phi(qf32)
        scale = global_scale(alpha, m)
        num = num + scale * (qphi @ state.S)
        den = den + scale * (qphi * state.z.unsqueeze(2)).sum(-1, keepdim=True)
        if b + max(tree_depths(parents)) > G:  # a path crosses into the next group: the keys before it turn global
            g = (qphi @ phi(keys).transpose(-1, -2)).masked_fill(~global_mask, 0.0)  # (φ of every key: the costly part)
            num = num + scale * (g @ vals)
            den = den + scale * g.sum(-1, keepdim=True)
    return (num / (den + EPS)).to(v.dtype)


def unfold_conv_kernel(weight: Tensor, parents: Sequence[int]) -> Tensor:
    """The DWConv kernel unfolded over a tree (img2col-style): [H, N, K−1+N].

    Row n holds the K taps of node n placed on its own column, its ancestors' columns (nearest
    first) and, past the root, the newest committed values of the tail (the first K−1 columns).
    """
    H, K = weight.shape
    N = len(parents)
    tree_depths(parents)  # validates
    cols = []
    for n in range(N):
        path, a = [], n
        while a >= 0 and len(path) < K:
            path.append(K - 1 + a)
            a = parents[a]
        path += [K - 2 - j for j in range(K - len(path))]  # tail: newest at column K-2
        cols.append(path)
    index = torch.tensor(cols, device=weight.device)  # [N, K]
    unfolded = weight.new_zeros(H, N, K - 1 + N)
    return unfolded.scatter_add(2, index.unsqueeze(0).expand(H, N, K), weight.unsqueeze(1).expand(H, N, K))


def conv_tree(v: Tensor, weight: Tensor, parents: Sequence[int], tail: Tensor) -> Tensor:
    """Causal DWConv of every tree node along its root-to-node path: [B, H, N, D] in v's dtype."""
    x = repeat_heads(torch.cat([tail, v.float()], 2), weight.shape[0])  # [B, H, K-1+N, D]
    return (unfold_conv_kernel(weight.float(), parents) @ x).to(v.dtype)
