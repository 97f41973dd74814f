"""Decoding state: one small object per layer, gathered in a transformers ``Cache``.

A linear layer keeps its attention state (``LinearState`` or ``GroupState``) and the conv tail; a
softmax layer kept by a hybrid model keeps its keys/values. All fp32 except softmax KV (model dtype).
The size of a linear layer's state does not depend on how many tokens it has seen: its tensors are
allocated once and written in place from the first token to the last.
"""

from __future__ import annotations

from collections.abc import Callable
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


Advance = Callable[[LayerState, Tensor, Tensor], LayerState]  # (state, keys, values) -> the state after them


class LinconvCache(Cache):
    """The per-model decoding state, usable as ``model(..., cache=c)`` and ``model.generate(cache=c)``.

    transformers' own layer list stays empty. The cache owns its rules; callers never edit its lists:

    - a linear layer reads ``state(i)`` and stores what it computed with ``put`` (sequence or step);
      a softmax layer kept by a hybrid goes through ``update`` like a KV cache;
    - speculative verification: ``begin_tree(parents)``, one forward in which linear layers compute
      every node from their state without changing it and ``hold`` the nodes' keys/values, then
      ``commit(path)`` (advance every layer along the accepted nodes) or ``rollback()``;
    - ``snapshot()`` / ``restore(snap)`` for drafts that decode ahead and take it back.
    """

    def __init__(self, num_layers: int):
        self.layers = []
        self.states: list[LayerState] = [LayerState() for _ in range(num_layers)]  # read-only outside
        self.lengths = [0] * num_layers
        self._tree: list[int] | None = None  # parent indices while a speculative tree is verified
        self._held: list[tuple[Tensor, Tensor, Advance] | None] = [None] * num_layers  # linear layers: the nodes' k, v
        self._past: list[int] = []  # lengths when the tree began

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.lengths[layer_idx or 0]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if not self.has_kv_layers:
            # no softmax layer holds keys: nothing reads the mask, so transformers need not build
            # a [chunk x context] one (64 MB per forward for a 2048-token chunk at 32K context)
            return query_length, 0
        return self.lengths[layer_idx] + query_length, 0

    @property
    def has_kv_layers(self) -> bool:
        """Whether softmax layers (kept by a hybrid) hold keys/values here."""
        return any(isinstance(s.attn, KVState) for s in self.states)

    @property
    def tree(self) -> list[int] | None:
        """The parents of the candidate tree being verified (None outside verification)."""
        return self._tree

    def state(self, layer_idx: int) -> LayerState:
        return self.states[layer_idx]

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

    def begin_tree(self, parents: list[int]) -> None:
        """Start verifying a candidate tree (parent index per node, -1 below the committed prefix)."""
        if self._tree is not None:
            raise RuntimeError("a candidate tree is already being verified: commit or roll it back first")
        self._tree, self._past = list(parents), list(self.lengths)

    def hold(self, layer_idx: int, keys: Tensor, values: Tensor, advance: Advance) -> None:
        """Keep a linear layer's tree-node keys/values [B, Hkv, N, D] until the accepted path is
        known; ``advance`` computes the layer's state after given keys/values."""
        self._held[layer_idx] = (keys, values, advance)

    def commit(self, path: list[int]) -> None:
        """Advance every layer along the accepted tree nodes ``path`` (root first) and end the tree.

        Linear layers advance from the keys/values computed during verification (rejected branches
        never touch their state); softmax layers keep the prefix plus the accepted nodes' keys/values.
        """
        for i, held in enumerate(self._held):
            if held is not None:
                keys, values, advance = held
                nodes = torch.tensor(path, device=keys.device)
                self.states[i] = advance(self.states[i], keys.index_select(2, nodes), values.index_select(2, nodes)).written_into(
                    self.states[i]
                )
                self.lengths[i] = self._past[i] + len(path)
        self._keep_kv(path)
        self._end_tree()

    def rollback(self) -> None:
        """End the tree without accepting any node: every layer is as before ``begin_tree``."""
        self._keep_kv([])
        self._end_tree()

    def _keep_kv(self, path: list[int]) -> None:
        for i, state in enumerate(self.states):
            if isinstance(state.attn, KVState) and self.lengths[i] > self._past[i]:
                past = self._past[i]
                nodes = torch.tensor([past + n for n in path], dtype=torch.long, device=state.attn.k.device)
                kv = [torch.cat([t[:, :, :past], t.index_select(2, nodes)], 2) for t in state.attn]
                self.states[i] = LayerState(KVState(*kv))
                self.lengths[i] = past + len(path)

    def _end_tree(self) -> None:
        self._tree, self._held, self._past = None, [None] * len(self.states), []

    def nbytes(self) -> int:
        """Bytes held by all layers' states."""
        return sum(t.numel() * t.element_size() for s in self.states for t in s.tensors())

    def snapshot(self) -> tuple[list[LayerState], list[int]]:
        """A copy of every layer's state, for ``restore``."""
        return [s.clone() for s in self.states], list(self.lengths)

    def restore(self, snap: tuple[list[LayerState], list[int]]) -> None:
        """Go back to a snapshot, writing it into the states' own tensors where the shapes match."""
        states, lengths = snap
        self.states, self.lengths = [s.written_into(old) for s, old in zip(states, self.states)], list(lengths)


def new_cache(model) -> Cache:
    """An empty decoding state for any causal LM: a LinconvCache for linconv models, else a KV cache."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
