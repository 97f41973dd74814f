"""Verify a candidate tree in one forward pass, accept greedily, commit the accepted path.

Linconv models verify through the attention's tree form (state contribution + tree-masked parallel
part + unfolded DWConv) and commit by advancing each layer's state along the accepted path from
the keys/values computed during verification: rejected branches never touch the state. Softmax
models (the baseline, and softmax layers kept by a hybrid) use the ordinary tree mask over their KV
cache, which is then cropped to the prefix plus the accepted path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from linconv.attention.state import LinconvCache
from linconv.ops import ancestor_mask
from linconv.speculative.tree import CandidateTree


def tree_attention_mask(tree: CandidateTree, past: int, dtype: torch.dtype, device) -> Tensor:
    """Additive mask [1, 1, N, past + N]: every node sees the prefix and its own ancestors."""
    allowed = torch.cat([torch.ones(len(tree), past, dtype=torch.bool), ancestor_mask(tree.parents)], 1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def verify(model: nn.Module, cache, tree: CandidateTree, past: int) -> tuple[Tensor, Tensor]:
    """Run the tree through ``model``: returns final hidden states [N, hidden] and logits [N, vocab]."""
    device = next(model.parameters()).device
    ids = torch.tensor([tree.tokens], device=device)
    positions = torch.tensor([[past + d - 1 for d in tree.depths]], device=device)
    linear = isinstance(cache, LinconvCache)
    softmax_layers = not linear or cache.has_kv_layers
    mask = tree_attention_mask(tree, past, model.dtype, device) if softmax_layers else None  # linear layers use the tree form
    if linear:
        cache.begin_tree(tree.parents)  # until commit: linear layers keep their state and hold the nodes
    try:
        hidden = model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True).last_hidden_state
    except BaseException:
        if linear:
            cache.rollback()
        raise
    return hidden[0], model.get_output_embeddings()(hidden[0]).float()


def accept_greedy(tree: CandidateTree, logits: Tensor) -> list[int]:
    """The longest root path whose every token is the target's greedy choice after its parent."""
    path = [0]
    while True:
        child = tree.children(path[-1]).get(int(logits[path[-1]].argmax()))
        if child is None:
            return path
        path.append(child)


def accept_sampled(tree: CandidateTree, logits: Tensor, sampler) -> tuple[list[int], int]:
    """Speculative sampling over a tree of deterministic guesses: the accepted path, and the token
    drawn where it stops (the next step's root).

    At each accepted node with target distribution p, the children are tried in turn: child c is
    accepted with probability p(c); if rejected, p loses c and is renormalised (the residual of a
    point-mass proposal). When every child is rejected the next token is drawn from what is left, so
    every emitted token follows the target distribution exactly.
    """
    path = [0]
    while True:
        p = sampler.probs(logits[path[-1]][None])[0]
        for token, child in tree.children(path[-1]).items():
            if sampler.uniform(p.device) < float(p[token]):
                path.append(child)
                break
            p[token] = 0.0
            p = p / p.sum()
        else:
            return path, int(sampler.draw(p[None]))


def commit(model: nn.Module, cache, past: int, path: list[int]) -> None:
    """Advance ``cache`` (which has seen ``past`` tokens) by the accepted tree nodes ``path``."""
    if isinstance(cache, LinconvCache):
        cache.commit(path)
        return
    index = torch.tensor([past + n for n in path], device=next(model.parameters()).device)
    for layer in cache.layers:  # transformers' KV cache: the prefix plus the accepted nodes
        layer.keys = torch.cat([layer.keys[:, :, :past], layer.keys.index_select(2, index)], 2)
        layer.values = torch.cat([layer.values[:, :, :past], layer.values.index_select(2, index)], 2)
