"""The attention module that replaces a model's softmax attention, layer by layer.

It keeps the original projection modules under their original names (so checkpoints and LoRA
targets still match) and adds only its own parameters: the DWConv kernel ``conv`` [H, K], the
global weight ``alpha``, the feature map's parameters and, without a denominator, ``out_norm`` [D].
The architecture adapter says how to get q, k, v (RoPE applied) and how to project the output;
the layer's ``AttentionSpec`` (built once by ``LinearizeConfig.specs``) says what to compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linconv import ops
from linconv.attention.features import FEATURE_MAPS
from linconv.attention.spec import AttentionSpec
from linconv.attention.state import LayerState, LinconvCache
from linconv.errors import LinconvError

SLICE_TOKENS = 512  # tokens per slice of a long segment (rounded to whole groups; see ``attend``)


def _fp32(*tensors: Tensor) -> list[Tensor]:
    """The attention computes in fp32 whatever the weights' dtype (bf16: q, k normalised or scaled,
    scores, the local and global parts and the conv summed before a single rounding)."""
    return [t.float() for t in tensors]


class LinconvAttention(nn.Module):
    def __init__(self, original: nn.Module, adapter, layer_idx: int, spec: AttentionSpec, dims: tuple[int, int, int]):
        super().__init__()
        for name in adapter.projections:
            self.add_module(name, getattr(original, name))
        self.adapter = adapter
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = dims
        H, D = self.num_heads, self.head_dim
        self.spec = spec
        self.group_size, self.chunk_size = spec.group_size, spec.chunk_size
        self.feature_map = FEATURE_MAPS[spec.feature](H, D, spec.seed) if spec.feature else None
        self.alpha = nn.Parameter(torch.ones(())) if spec.feature and spec.score else None
        self.out_norm = None if spec.normalize else nn.Parameter(torch.ones(D))
        taps = spec.conv_taps if spec.conv_mask else 2 * spec.conv_taps - 1  # unmasked: K−1 future taps too
        self.conv = nn.Parameter(torch.zeros(H, taps)) if spec.conv_taps else None  # zero: starts as no conv
        self.conv_mask = spec.conv_mask
        if spec.linformer:
            g = torch.Generator().manual_seed(spec.seed)
            proj = torch.randn(spec.linformer_rank, spec.linformer_max_len, generator=g) / spec.linformer_rank**0.5
            self.register_buffer("linformer_proj", proj)  # [r, max_len]
        self.transfer = False  # attention transfer: also compute the softmax teacher (see forward)
        self.transfer_loss: Tensor | None = None
        self.teacher = False  # the original model: softmax attention only (``linconv.teacher.teacher_mode``)

    def extra_repr(self) -> str:
        return f"variant={self.spec.variant}, heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        q, k, v = self.adapter.qkv(self, hidden_states, position_embeddings)  # [B, H, T, D], [B, Hkv, T, D] x2
        if self.teacher:  # no linear path, no conv, no α: exactly the attention the layer replaced
            if isinstance(cache, LinconvCache):
                raise LinconvError("teacher mode runs whole sequences; it cannot decode from a linconv state")
            return self.adapter.output(self, self.softmax_attention(q, k, v)), None
        if not isinstance(cache, LinconvCache):
            cache = None  # transformers may hand us its own cache; linconv keeps its state elsewhere
        elif not self.spec.causal:
            raise LinconvError(f"this {self.spec.variant!r} model is not causal and cannot decode step by step")
        state = LayerState() if cache is None else cache.state(self.layer_idx)
        if cache is not None and state.attn is None:
            state = self._empty_state(q, k, v)
        if cache is not None and cache.tree is not None:
            out, (keys, values) = self.attend_tree(q, k, v, state, cache.tree)
            cache.hold(self.layer_idx, keys, values, self.advance)
            return self.adapter.output(self, out), None
        out, new_state = self.attend(q, k, v, state)
        if self.transfer:
            teacher = self.softmax_attention(q, k, v)
            self.transfer_loss = F.mse_loss(out.float(), teacher.float())
            out = teacher  # later layers see the original model's activations
        if cache is not None:
            cache.put(self.layer_idx, new_state, q.shape[2])
        return self.adapter.output(self, out), None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """Attention of a segment continuing ``state``: q [B, H, T, D], k, v [B, Hkv, T, D].

        A decoding step (T = 1) writes into ``state``'s tensors in place; longer segments return a
        new state of the same shapes. A long segment runs in slices of about SLICE_TOKENS (whole
        groups), carrying the state, so that its fp32 temporaries (scores, features, repeated keys)
        do not grow with its length: one forward then fits as many tokens as the original's.
        """
        length = q.shape[2]
        size = max(self.group_size, SLICE_TOKENS // self.group_size * self.group_size)
        if length <= size or not self.spec.causal:
            return self._attend_segment(q, k, v, state)
        out = v.new_empty(*q.shape[:3], v.shape[-1])
        start = 0
        while start < length:
            fill = state.attn.fill if isinstance(state.attn, ops.GroupState) else 0
            end = min(length, start + size - fill)  # later slices start on a group boundary
            out[:, :, start:end], state = self._attend_segment(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], state)
            start = end
        return out, state

    def _attend_segment(self, q: Tensor, k: Tensor, v: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        if self.spec.linformer:
            return self._linformer(q, *self._repeat(k, v)), state
        dtype = v.dtype
        q, k, v = self._prepare(*_fp32(q, k, v))  # one rounding to the model's dtype, at the end
        phi, var = self.feature_map, self.spec
        if var.score:
            out, attn = ops.grouped_attention(
                q, k, v, state.attn, group_size=self.group_size, score=var.score, phi=phi, alpha=self._alpha, sinks=var.sinks
            )
        elif q.shape[2] == 1 and state.attn is not None:
            kr, vr = self._repeat(k, v)
            out, attn = ops.linear_attention_step(phi(q)[:, :, 0], phi(kr)[:, :, 0], vr[:, :, 0], state.attn)
            out = out.unsqueeze(2)
        else:
            kr, vr = self._repeat(k, v)
            out, attn = ops.linear_attention(phi(q), phi(kr), vr, state.attn, normalize=var.normalize, chunk_size=self.chunk_size)
        out, conv = self._norm(out), state.conv
        if self.conv is not None and not self.conv_mask:
            out = out + ops.unmasked_dwconv(v, self.conv)
        elif self.conv is not None:
            local, conv = ops.causal_dwconv(v, self.conv, conv)
            out = out + local
        return out.to(dtype), LayerState(attn, conv)

    def attend_tree(self, q: Tensor, k: Tensor, v: Tensor, state: LayerState, parents: list[int]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Every node of a candidate tree as if its root-to-node path had been decoded from ``state``.

        q [B, H, N, D], k, v [B, Hkv, N, D] hold the N tree nodes. The state is left alone; returns
        the outputs and the nodes' prepared keys/values, from which ``advance`` commits the accepted path.
        """
        dtype = v.dtype
        q, k, v = self._prepare(*_fp32(q, k, v))
        phi, var = self.feature_map, self.spec
        if var.score:
            out = ops.grouped_tree(q, k, v, parents, state.attn, group_size=self.group_size, score=var.score, phi=phi, alpha=self._alpha)
        else:
            kr, vr = self._repeat(k, v)
            out = ops.linear_tree(phi(q), phi(kr), vr, parents, state.attn)
        out = self._norm(out)
        if self.conv is not None:
            out = out + ops.conv_tree(v, self.conv, parents, state.conv)
        return out.to(dtype), (k, v)

    def advance(self, state: LayerState, k: Tensor, v: Tensor) -> LayerState:
        """The state after also seeing prepared keys/values [B, Hkv, T, D] (from ``attend_tree``)."""
        phi = self.feature_map
        if self.spec.score:
            attn = ops.advance_group(state.attn, k, v, self.group_size, phi)
        else:
            kr, vr = self._repeat(k, v)
            attn = ops.advance_linear(state.attn, phi(kr), vr)
        conv = state.conv if self.conv is None else ops.advance_conv(state.conv, v)
        return LayerState(attn, conv)

    def _empty_state(self, q: Tensor, k: Tensor, v: Tensor) -> LayerState:
        """The decoding state before any token, for q [B, H, *, D] and k, v [B, Hkv, *, D]."""
        if self.spec.score:
            attn = ops.empty_group_state(q, k, v, self.feature_map, self.group_size, self.spec.sinks)
        else:
            attn = ops.empty_linear_state(self.feature_map(q[:, :, :0].float()), v, self.spec.normalize)
        conv = None if self.conv is None else ops.empty_conv_tail(v, self.conv.shape[-1])
        return LayerState(attn, conv)

    def softmax_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The original model's causal softmax attention from the same q, k, v: the transfer teacher."""
        rep = self.num_heads // self.num_kv_heads
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)

    @property
    def _alpha(self) -> Tensor | float:
        return self.alpha if self.alpha is not None else 1.0

    def _repeat(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Grouped-query attention: one key/value head per query head."""
        rep = self.num_heads // self.num_kv_heads
        return k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

    def _prepare(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """L2-normalise q, k and/or scale q by 1/√D as the spec asks; kv heads stay as they are."""
        if self.spec.unit_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.spec.scale_q:
            q = q * self.head_dim**-0.5
        return q, k, v

    def _norm(self, out: Tensor) -> Tensor:
        """Without a denominator the output is RMS-normalised per head (TransNormer)."""
        if self.out_norm is None:
            return out
        return F.rms_norm(out.float(), (self.head_dim,), self.out_norm.float()).to(out.dtype)

    def _linformer(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T = q.shape[2]
        if self.linformer_proj.shape[1] < T:
            raise LinconvError(f"linformer was built for at most {self.linformer_proj.shape[1]} tokens, got {T}")
        E = self.linformer_proj[:, :T].to(k.dtype)  # [r, T]: mixes all positions, the future included
        return F.scaled_dot_product_attention(q, E @ k, E @ v)
