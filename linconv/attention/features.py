"""Feature maps φ of the kernelized (global) part: [B, H, ..., D] -> [B, H, ..., F].

All are modules so that learnable (hedgehog) and random-but-saved (performer) maps sit in the
checkpoint beside the attention's other parameters. ``FEATURE_MAPS`` is the registry a variant's
``feature`` names; every map is built from the layer's (heads, head dim, seed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureMap(nn.Module):
    """A feature map of one layer; the stateless ones ignore the layer's shape and seed."""

    def __init__(self, num_heads: int, head_dim: int, seed: int):
        super().__init__()


class ReLU(FeatureMap):
    """φ(x) = relu(x)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class ELU(FeatureMap):
    """φ(x) = elu(x) + 1 (Katharopoulos et al.): positive everywhere."""

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1


class Identity(FeatureMap):
    """φ(x) = x: FLASH's global part, used without a denominator."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Performer(FeatureMap):
    """FAVOR+ positive orthogonal random features of the softmax kernel exp(q·k/√D), F = D of them.

    φ(x) = exp(W x' − |x'|²/2) / √F with x' = x / D^¼ and W [F, D] blocks of random orthogonal rows
    scaled to chi-distributed norms, drawn from ``seed`` and saved as a buffer. The exponent is
    clamped per token (never across tokens, so every execution form sees the same kernel).
    """

    def __init__(self, num_heads: int, head_dim: int, seed: int):
        super().__init__(num_heads, head_dim, seed)
        num_features = head_dim
        g = torch.Generator().manual_seed(seed)
        blocks = []
        for _ in range(num_heads * -(-num_features // head_dim)):
            Q, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=g))
            blocks.append(Q.T)
        W = torch.cat(blocks).view(num_heads, -1, head_dim)[:, :num_features]
        W = W * torch.randn(num_heads, num_features, head_dim, generator=g).norm(dim=-1, keepdim=True)
        self.register_buffer("projection", W)  # [H, F, D]

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() * x.shape[-1] ** -0.25
        W = self.projection.view(self.projection.shape[0], *([1] * (x.dim() - 4)), *self.projection.shape[1:])
        proj = x @ W.transpose(-1, -2)  # [B, H, ..., F]
        exponent = (proj - x.square().sum(-1, keepdim=True) / 2).clamp(max=30.0)
        return torch.exp(exponent) / math.sqrt(W.shape[-2])


class Hedgehog(FeatureMap):
    """φ(x) = [softmax(x W), softmax(−x W)] per head, W learnable (LoLCATs); F = 2·D.

    Initialised to the identity, so training by attention transfer starts from softmax-of-x features.
    """

    def __init__(self, num_heads: int, head_dim: int, seed: int):
        super().__init__(num_heads, head_dim, seed)
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))  # [H, D, D]

    def forward(self, x: Tensor) -> Tensor:
        W = self.weight.view(self.weight.shape[0], *([1] * (x.dim() - 4)), *self.weight.shape[1:])
        h = x.float() @ W.float()
        return torch.cat([torch.softmax(h, -1), torch.softmax(-h, -1)], -1)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "relu": ReLU,
    "elu": ELU,
    "identity": Identity,
    "performer": Performer,
    "hedgehog": Hedgehog,
}
