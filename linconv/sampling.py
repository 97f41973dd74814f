"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling, seeded.

Apart from the engine (``linconv.generate``) so that speculative sampling reuses the same
distribution and generator (``probs``, ``draw``, ``uniform``).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Sampler:
    """Greedy (temperature 0) or temperature / top-k / top-p sampling from logits [B, V]."""

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None):
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.generator: torch.Generator | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        return self.draw(self.probs(logits))

    def probs(self, logits: Tensor) -> Tensor:
        """The distribution sampled from: softmax(logits / T) restricted to top-k and top-p. [B, V]"""
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = logits.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # mass before a token already reaches p; keeps the top one
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return logits.softmax(-1)

    def draw(self, probs: Tensor) -> Tensor:
        """One token per row of ``probs`` [B, V]."""
        return torch.multinomial(probs, 1, generator=self._generator(probs.device))[:, 0]

    def uniform(self, device) -> float:
        """A U(0, 1) draw from the same seeded generator (speculative acceptance tests)."""
        return float(torch.rand((), generator=self._generator(device), device=device))

    def _generator(self, device) -> torch.Generator:
        if self.generator is None or self.generator.device != torch.device(device):
            self.generator = torch.Generator(device)
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            else:
                self.generator.seed()
        return self.generator
