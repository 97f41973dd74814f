"""Decoding state: one small object per layer, gathered in a transformers ``Cache``.

A linear layer keeps its attention state (``LinearState`` or ``GroupState``) and the conv tail; a
softmax layer kept by a hybrid model keeps its keys/values. All fp32 except softmax KV (model dtype).
The size of a linear layer's state does not depend on how many tokens it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from linconv.ops import GroupState, LinearState


class KVState(NamedTuple):
    k: Tensor  # [B, Hkv, T, D]
    v: Tensor  # [B, Hkv, T, D]


@dataclass
class LayerState:
    attn: LinearState | GroupState | KVState | None = None
    conv: Tensor | None = None  # [B, H, K-1, D]

    def tensors(self) -> list[Tensor]:
        return [t for t in (*(self.attn or ()), self.conv) if t is not None]

    def clone(self) -> LayerState:
        attn = None if self.attn is None else type(self.attn)(*(None if t is None else t.clone() for t in self.attn))
        return replace(self, attn=attn, conv=None if self.conv is None else self.conv.clone())


def _own(t: Tensor | None) -> Tensor | None:
    """``t``, or a copy of it when it is a view into a buffer more than twice its size."""
    if t is not None and t.untyped_storage().nbytes() > 2 * t.numel() * t.element_size():
        return t.clone()
    return t


def _compact(state: LayerState) -> LayerState:
    attn = None if state.attn is None else type(state.attn)(*(_own(t) for t in state.attn))
    return replace(state, attn=attn, conv=_own(state.conv))


class LinconvCache(Cache):
    """The per-model decoding state, usable as ``model(..., cache=c)`` and ``model.generate(cache=c)``.

    transformers' own layer list stays empty: linconv's attention modules read and write
    ``states[layer]`` themselves (``put``); softmax layers kept by a hybrid go through ``update``.
    While ``tree`` is set, linear layers verify a candidate tree without touching their state and
    leave the nodes' keys/values in ``pending`` for committing the accepted path.
    """

    def __init__(self, num_layers: int):
        self.layers = []
        self.states: list[LayerState] = [LayerState() for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.tree: list[int] | None = None  # parent indices while a speculative tree is verified
        self.pending: list[tuple[Tensor, Tensor] | None] = [None] * num_layers  # the tree nodes' k, v

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.lengths[layer_idx or 0]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if not any(isinstance(s.attn, KVState) for s in self.states):
            # no softmax layer holds keys: nothing reads the mask, so transformers need not build
            # a [chunk x context] one (64 MB per forward for a 2048-token chunk at 32K context)
            return query_length, 0
        return self.lengths[layer_idx] + query_length, 0

    def put(self, layer_idx: int, state: LayerState, new_tokens: int) -> None:
        """Store a linear layer's state after it has seen ``new_tokens`` more tokens.

        After a prefill chunk the group buffer and conv tail are small views of the chunk's keys and
        values; they are copied so the state does not keep whole chunks alive (30 layers x 3 tensors
        of a 2048-token chunk would otherwise pin ~400 MB on the default model).
        """
        self.states[layer_idx] = _compact(state)
        self.lengths[layer_idx] += new_tokens

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """The KV cache of a softmax layer that a hybrid model kept."""
        old = self.states[layer_idx].attn
        if old is not None:
            key_states = torch.cat([old.k, key_states], 2)
            value_states = torch.cat([old.v, value_states], 2)
        self.states[layer_idx] = LayerState(KVState(key_states, value_states))
        self.lengths[layer_idx] = key_states.shape[2]
        return key_states, value_states

    def nbytes(self) -> int:
        """Bytes held by all layers' states."""
        return sum(t.numel() * t.element_size() for s in self.states for t in s.tensors())

    def snapshot(self) -> tuple[list[LayerState], list[int]]:
        return [s.clone() for s in self.states], list(self.lengths)

    def restore(self, snap: tuple[list[LayerState], list[int]]) -> None:
        states, lengths = snap
        self.states, self.lengths = [s.clone() for s in states], list(lengths)


def new_cache(model) -> Cache:
    """An empty decoding state for any causal LM: a LinconvCache for linconv models, else a KV cache."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
