"""Decoding state: one small object per layer, gathered in a transformers ``Cache``.

A linear layer keeps its attention state (``LinearState`` or ``GroupState``) and the conv tail; a
softmax layer kept by a hybrid model keeps its keys/values. All fp32 except softmax KV (model dtype).
The size of a linear layer's state does not depend on how many tokens it has seen: its tensors are
allocated once and written in place from the first token to the last.
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
    conv: Tensor | None = None  # [B, Hkv, K-1, D]

    def tensors(self) -> list[Tensor]:
        return [t for t in (*(self.attn or ()), self.conv) if isinstance(t, Tensor)]

    def clone(self) -> LayerState:
        """A copy with storage of its own (never a view into a prefill chunk)."""
        own = lambda x: x.clone(memory_format=torch.contiguous_format) if isinstance(x, Tensor) else x
        attn = None if self.attn is None else type(self.attn)(*map(own, self.attn))
        return replace(self, attn=attn, conv=own(self.conv))

    def written_into(self, dest: LayerState) -> LayerState:
        """This state held in ``dest``'s tensors (copied where they are other tensors of the same
        shapes), so that a layer's state keeps its storage from the first token to the last; a
        copy of its own when ``dest`` has another structure (the first state of a layer)."""
        mine, theirs = self.tensors(), dest.tensors()
        if type(self.attn) is not type(dest.attn) or [t.shape for t in mine] != [t.shape for t in theirs]:
            return self.clone()
        for src, dst in zip(mine, theirs):
            if src is not dst:
                dst.copy_(src)
        held = iter(theirs)
        attn = type(self.attn)(*(next(held) if isinstance(x, Tensor) else x for x in self.attn))
        return LayerState(attn, None if self.conv is None else next(held))


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

        The values are written into the layer's existing tensors (a decoding step has already
        written there in place), so the state never changes size or storage. After a prefill chunk
        the conv tail is a view of the chunk's values; copying it keeps the chunk from staying alive.
        """
        self.states[layer_idx] = state.written_into(self.states[layer_idx])
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
        self.states, self.lengths = [s.written_into(old) for s, old in zip(states, self.states)], list(lengths)


def new_cache(model) -> Cache:
    """An empty decoding state for any causal LM: a LinconvCache for linconv models, else a KV cache."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
