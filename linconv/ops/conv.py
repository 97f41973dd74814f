"""Causal depthwise convolution along time on the value stream (the paper's masked DWConv).

One kernel per head, shared across the head dimension: ``y_t = Σ_{j<K} w[h, j] · v_{t−j}``, tap 0
being the current token. Storing only the K causal taps is the paper's 2K−1-tap kernel with its
future half masked to zero, applied without ever reading a future position.

Layout: v [B, Hkv, T, D]; weight [H, K] (H a multiple of Hkv: grouped-query value heads are read by
the H // Hkv query heads that share them); tail [B, Hkv, K−1, D], the last K−1 values before the
segment (zeros before the first token); outputs [B, H, T, D]. The same function is the sequence
form and, with T = 1, the step (which shifts the given tail in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from linconv.ops.linear import repeat_heads


def empty_conv_tail(v: Tensor, kernel_size: int) -> Tensor:
    """Zero tail for v [B, H, *, D]: the conv reads zeros before the first token."""
    B, H, D = v.shape[0], v.shape[1], v.shape[-1]
    return v.new_zeros(B, H, kernel_size - 1, D, dtype=torch.float32)


def causal_dwconv(v: Tensor, weight: Tensor, tail: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns the convolved values [B, H, T, D] (v's dtype) and the new tail (fp32).

    The sequence form returns the tail as a view of its input; the step (T = 1) writes it into
    ``tail`` in place and returns that.
    """
    B, Hkv, T, D = v.shape
    H, K = weight.shape
    if tail is None:
        tail = empty_conv_tail(v, K)
    x = torch.cat([tail, v.float()], 2)  # [B, Hkv, K-1+T, D]
    if T == 1:  # decoding step: one product of the K taps with the K values per kv head
        y = weight.float().flip(-1).view(1, Hkv, H // Hkv, K) @ x  # [B, Hkv, rep, D]
        tail.copy_(x[:, :, 1:])
        return y.view(B, H, 1, D).to(v.dtype), tail
    y = _depthwise(repeat_heads(x, H), weight.flip(-1))
    return y.to(v.dtype), x[:, :, x.shape[2] - (K - 1) :]


def unmasked_dwconv(v: Tensor, weight: Tensor) -> Tensor:
    """The paper's 2K−1-tap kernel *without* its mask, for the ablation that shows why it is needed.

    ``weight`` [H, 2K−1]: ``y_t = Σ_{|j|<K} w[h, K−1+j] · v_{t−j}``, so taps K−1.. are the causal
    kernel and taps 0..K−2 read the K−1 *following* tokens. Not causal: it leaks the future, so it
    has no step or tree form.
    """
    K = (weight.shape[-1] + 1) // 2
    x = F.pad(repeat_heads(v.float(), weight.shape[0]), (0, 0, K - 1, K - 1))  # zeros before the first and after the last token
    return _depthwise(x, weight.flip(-1)).to(v.dtype)


def _depthwise(x: Tensor, kernel: Tensor) -> Tensor:
    """Valid cross-correlation of x [B, H, L, D] along L with one kernel [H, K] per head."""
    B, H, L, D = x.shape
    K = kernel.shape[-1]
    channels = x.permute(0, 1, 3, 2).reshape(B, H * D, L)
    w = kernel.float().repeat_interleave(D, 0).unsqueeze(1)  # [H*D, 1, K]
    return F.conv1d(channels, w, groups=H * D).view(B, H, D, L - K + 1).permute(0, 1, 3, 2)


def advance_conv(tail: Tensor, v: Tensor) -> Tensor:
    """The tail after also seeing ``v`` [B, H, T, D] (no outputs)."""
    x = torch.cat([tail, v.float()], 2)
    return x[:, :, x.shape[2] - tail.shape[2] :]
