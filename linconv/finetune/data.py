"""The token windows of a run and the order in which the steps see them.

Determinism: the windows of step s of a stage are a function of (seed, stage number, s) — an
epoch-wise seeded permutation — so a resumed run sees exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import torch
from torch import Tensor

from linconv.data import load_text, tokenize, windows
from linconv.errors import LinconvError


def mix(*xs: int) -> int:
    """A seed from several integers (the run's seed, a stage number, a step, a rank, …)."""
    h = 0x5EED
    for x in xs:
        h = (h * 1_000_003 + int(x)) % (2**61 - 1)
    return h


def token_windows(tokenizer, spec: str | None, split: str, seq_len: int, what: str, max_windows: int | None = None) -> Tensor:
    """The text ``spec`` (None: the built-in ``split``) as windows [N, seq_len] of tokens."""
    text = load_text(spec, split=split)
    if max_windows is not None:  # tokenize a generous prefix only
        text = text[: max_windows * seq_len * 32]
    old = tokenizer.model_max_length
    tokenizer.model_max_length = 1 << 62  # one long text on purpose: silence the "too long" warning
    try:
        tokens = tokenize(tokenizer, text)
    finally:
        tokenizer.model_max_length = old
    if tokens.numel() < seq_len:
        raise LinconvError(
            f"the {what} text has {tokens.numel()} tokens, fewer than one "
            f"--seq-len window of {seq_len}; use more text or a shorter --seq-len"
        )
    return windows(tokens, seq_len, None if max_windows is None else max_windows * seq_len)


class WindowOrder:
    """Which windows each process takes at each micro-step: every process its own share of the step."""

    def __init__(self, windows: Tensor, batch_size: int, grad_accum: int, seed: int, world: int, rank: int):
        self.windows, self.batch_size, self.grad_accum = windows, batch_size, grad_accum
        self.seed, self.world, self.rank = seed, world, rank
        self._perm: tuple = (None, None)  # ((stage, epoch), that epoch's window order)

    def batch(self, stage: int, step: int, micro: int) -> Tensor:
        """Windows [batch_size, seq_len] of micro-step ``micro`` of ``step`` of the stage numbered ``stage``."""
        n = self.windows.shape[0]
        per_step = self.batch_size * self.grad_accum * self.world
        start = step * per_step + (micro * self.world + self.rank) * self.batch_size
        rows = []
        for pos in range(start, start + self.batch_size):
            epoch, i = divmod(pos, n)
            if self._perm[0] != (stage, epoch):
                g = torch.Generator().manual_seed(mix(self.seed, stage, epoch))
                self._perm = ((stage, epoch), torch.randperm(n, generator=g))
            rows.append(int(self._perm[1][i]))
        return self.windows[rows]
