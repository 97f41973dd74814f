"""The attention module that replaces a model's softmax attention, layer by layer.

It keeps the original projection modules under their original names (so checkpoints and LoRA
targets still match) and adds only its own parameters: the DWConv kernel ``conv`` [H, K], the
global weight ``alpha``, the feature map's parameters and, without a denominator, ``out_norm`` [D].
The architecture adapter says how to get q, k, v (RoPE applied) and how to project the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linconv import ops
from linconv.attention.features import make_feature_map
from linconv.attention.state import LayerState, LinconvCache
from linconv.attention.variants import get_variant
from linconv.config import LinearizeConfig
from linconv.errors import LinconvError


class LinconvAttention(nn.Module):
    def __init__(self, original: nn.Module, adapter, layer_idx: int, num_layers: int, cfg: LinearizeConfig, dims: tuple[int, int, int]):
        super().__init__()
        for name in adapter.projections:
            self.add_module(name, getattr(original, name))
        self.adapter = adapter
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = dims
        H, D = self.num_heads, self.head_dim
        self.variant = get_variant(cfg.attention).for_layer(layer_idx, num_layers)
        self.group_size, self.chunk_size = cfg.group_size, cfg.chunk_size
        seed = cfg.seed * 1000 + layer_idx
        self.feature_map = make_feature_map(self.variant.feature, H, D, seed) if self.variant.feature else None
        self.alpha = nn.Parameter(torch.ones(())) if self.variant.feature and self.variant.score else None
        self.out_norm = None if self.variant.normalize else nn.Parameter(torch.ones(D))
        self.conv = nn.Parameter(torch.zeros(H, cfg.kernel)) if cfg.kernel else None  # zero: starts as no conv
        if not self.variant.causal:
            g = torch.Generator().manual_seed(seed)
            proj = torch.randn(cfg.linformer_rank, cfg.linformer_max_len, generator=g) / cfg.linformer_rank**0.5
            self.register_buffer("linformer_proj", proj)  # [r, max_len]
        self.transfer = False  # attention transfer: also compute the softmax teacher (see forward)
        self.transfer_loss: Tensor | None = None

    def extra_repr(self) -> str:
        return f"variant={self.variant.name}, heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        q, k, v = self.adapter.qkv(self, hidden_states, position_embeddings)  # [B, H, T, D], [B, Hkv, T, D] x2
        if not isinstance(cache, LinconvCache):
            cache = None  # transformers may hand us its own cache; linconv keeps its state elsewhere
        elif not self.variant.causal:
            raise LinconvError(f"variant {self.variant.name!r} is not causal and cannot decode step by step")
        state = cache.states[self.layer_idx] if cache is not None else LayerState()
        out, new_state = self.attend(q, k, v, state)
        if self.transfer:
            teacher = self.softmax_attention(q, k, v)
            self.transfer_loss = F.mse_loss(out.float(), teacher.float())
            out = teacher  # later layers see the original model's activations
        if cache is not None:
            cache.put(self.layer_idx, new_state, q.shape[2])
        return self.adapter.output(self, out), None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """Attention of a segment continuing ``state``: q [B, H, T, D], k, v [B, Hkv, T, D]."""
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if not self.variant.causal:
            return self._linformer(q, k, v), state
        q, k = self._prepare(q, k)
        phi, var = self.feature_map, self.variant
        if var.score:
            out, attn = ops.grouped_attention(q, k, v, state.attn, group_size=self.group_size, score=var.score, phi=phi, alpha=self.alpha if self.alpha is not None else 1.0)
        elif q.shape[2] == 1 and state.attn is not None:
            out, attn = ops.linear_attention_step(phi(q)[:, :, 0], phi(k)[:, :, 0], v[:, :, 0], state.attn)
            out = out.unsqueeze(2)
        else:
            out, attn = ops.linear_attention(phi(q), phi(k), v, state.attn, normalize=var.normalize, chunk_size=self.chunk_size)
        if self.out_norm is not None:
            out = F.rms_norm(out.float(), (self.head_dim,), self.out_norm.float()).to(v.dtype)
        conv = state.conv
        if self.conv is not None:
            local, conv = ops.causal_dwconv(v, self.conv, conv)
            out = out + local
        return out, LayerState(attn, conv)

    def softmax_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The original model's causal softmax attention from the same q, k, v: the transfer teacher."""
        rep = self.num_heads // self.num_kv_heads
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)

    def _prepare(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.variant.unit_qk:
            return F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.variant.score == "softmax":
            return q * self.head_dim**-0.5, k
        return q, k

    def _linformer(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T = q.shape[2]
        if T > self.linformer_proj.shape[1]:
            raise LinconvError(f"linformer was built for at most {self.linformer_proj.shape[1]} tokens, got {T}")
        E = self.linformer_proj[:, :T].to(k.dtype)  # [r, T]: mixes all positions, the future included
        return F.scaled_dot_product_attention(q, E @ k, E @ v)
