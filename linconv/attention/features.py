"""Feature maps φ of the kernelized (global) part: [B, H, ..., D] -> [B, H, ..., F].

All are modules so that learnable (hedgehog) and random-but-saved (performer) maps sit in the
checkpoint beside the attention's other parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ReLU(nn.Module):
    """φ(x) = relu(x)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class ELU(nn.Module):
    """φ(x) = elu(x) + 1 (Katharopoulos et al.): positive everywhere."""

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1


class Identity(nn.Module):
    """φ(x) = x: FLASH's global part, used without a denominator."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Performer(nn.Module):
    """FAVOR+ positive orthogonal random features of the softmax kernel exp(q·k/√D).

    φ(x) = exp(W x' − |x'|²/2) / √F with x' = x / D^¼ and W [F, D] blocks of random orthogonal rows
    scaled to chi-distributed norms, drawn from ``seed`` and saved as a buffer. The exponent is
    clamped per token (never across tokens, so every execution form sees the same kernel).
    """

    def __init__(self, num_heads: int, head_dim: int, num_features: int, seed: int):
        super().__init__()
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


class Hedgehog(nn.Module):
    """φ(x) = [softmax(x W), softmax(−x W)] per head, W learnable (LoLCATs); F = 2·D.

    Initialised to the identity, so training by attention transfer starts from softmax-of-x features.
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))  # [H, D, D]

    def forward(self, x: Tensor) -> Tensor:
        W = self.weight.view(self.weight.shape[0], *([1] * (x.dim() - 4)), *self.weight.shape[1:])
        h = x.float() @ W.float()
        return torch.cat([torch.softmax(h, -1), torch.softmax(-h, -1)], -1)


def make_feature_map(name: str, num_heads: int, head_dim: int, seed: int) -> nn.Module:
    """Build the feature map ``name`` for one layer (``seed`` fixes performer's projection)."""
    if name == "performer":
        return Performer(num_heads, head_dim, num_features=head_dim, seed=seed)
    if name == "hedgehog":
        return Hedgehog(num_heads, head_dim)
    return {"relu": ReLU, "elu": ELU, "identity": Identity}[name]()
