"""Tree shape from measurement: the static tree (widths per depth) that maximises tokens per second.

Two measurements on the device at hand (Medusa / Sequoia style, with the empirical acceptance
itself rather than a model of it):

- **ranks** (``measure_ranks``): the target continues held-out prompts greedily; at every position
  the draft guesses along the true continuation, and we record the rank of the target's token among
  the draft's candidates at depth 1, 2, … A tree of widths w accepts depth d at that position iff
  rank_j < w_j for every j ≤ d, so the expected tokens per step of any static tree are exact averages
  over the positions (no independence assumption between depths).
- **cost** (``measure_cost``): seconds to verify a tree of N nodes (one forward), and seconds the
  draft takes to propose a tree, fitted as a + b·depth + c·nodes.

``best_tree`` searches the non-increasing width sequences under a node budget for the highest
expected tokens / (verify + draft) seconds. The result is stored with the draft (``store_tree``)
and used unless ``--tree-widths`` overrides it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from linconv.attention.state import new_cache
from linconv.data import load_text, tokenize, windows
from linconv.errors import LinconvError
from linconv.generate import generate, sync_device
from linconv.speculative.tree import CandidateTree
from linconv.speculative.verify import verify

MAX_TREE_NODES = 4096  # one verification forward holds every node: beyond this it is no longer cheap
COST_SIZES = (1, 2, 4, 8, 16, 32, 64)  # tree sizes whose verification is timed
COST_SHAPES = ((1,), (1, 1, 1), (1,) * 6, (4,), (4, 2, 2), (8, 4, 2, 1), (2, 2, 2, 2, 2))  # proposals timed


def tree_nodes(widths: Sequence[int]) -> int:
    """Nodes of the tree with ``widths[d]`` children under every node of depth d, root included."""
    total, level = 1, 1
    for w in widths:
        level *= w
        total += level
    return total


def check_widths(widths: Sequence[int], vocab: int) -> None:
    """LinconvError unless ``widths`` is a static tree a draft can propose from a ``vocab``-token
    vocabulary and one verification forward can hold."""
    if not widths or min(widths) <= 0:
        raise LinconvError(f"--tree-widths must be positive per depth, got {list(widths)}")
    if max(widths) > vocab:
        raise LinconvError(f"--tree-widths {max(widths)} is more candidates than the vocabulary's {vocab} tokens")
    if (nodes := tree_nodes(widths) - 1) > MAX_TREE_NODES:
        raise LinconvError(f"--tree-widths {','.join(map(str, widths))} makes a tree of {nodes:,} nodes; at most {MAX_TREE_NODES:,}")


@dataclass
class TreeCost:
    """Measured seconds: ``verify_s[N]`` for a tree of N nodes; a proposal ≈ a + b·depth + c·nodes."""

    verify_s: dict[int, float]
    draft_s: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def verify(self, nodes: int) -> float:
        """Piecewise-linear in the measured sizes (extrapolated linearly past the largest)."""
        sizes = sorted(self.verify_s)
        if nodes <= sizes[0] or len(sizes) == 1:
            return self.verify_s[sizes[0]]
        lo, hi = next(((a, b) for a, b in pairwise(sizes) if nodes <= b), sizes[-2:])
        t = (nodes - lo) / (hi - lo)
        return self.verify_s[lo] + t * (self.verify_s[hi] - self.verify_s[lo])

    def step(self, widths: Sequence[int]) -> float:
        """Seconds of one speculative step with a tree of these widths (no draft: plain decoding)."""
        if not widths:
            return self.verify(1)
        a, b, c = self.draft_s
        n = tree_nodes(widths)
        return self.verify(n) + a + b * len(widths) + c * (n - 1)


@dataclass
class TreeShape:
    widths: list[int]
    nodes: int
    expected_tokens: float  # per step, the root included
    step_s: float
    acceptance: list[float]  # per depth: accepted at depth d among the positions accepted to d − 1
    positions: int  # measured positions behind the figures
    plain_tokens_per_s: float = 0.0  # 1 / (verification of one node): plain decoding through the same path
    top1: list[float] = field(default_factory=list)  # per depth: the draft's first guess is the target's token
    cost: dict = field(default_factory=dict)  # the TreeCost measured (seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.expected_tokens / self.step_s if self.step_s else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"tokens_per_s": self.tokens_per_s}


def accepted_depths(ranks: Tensor, widths: Sequence[int]) -> Tensor:
    """Per position, how many draft depths a tree of ``widths`` accepts (ranks [P, D], D ≥ len(widths))."""
    if not widths:
        return torch.zeros(ranks.shape[0], dtype=torch.long)
    ok = ranks[:, : len(widths)] < torch.tensor(widths)
    return ok.long().cumprod(1).sum(1)


def evaluate_tree(ranks: Tensor, cost: TreeCost, widths: Sequence[int]) -> TreeShape:
    """The figures of one static tree, from measured ranks and costs."""
    accepted = accepted_depths(ranks, widths)
    acceptance = []
    for d in range(len(widths)):
        reached = int((accepted >= d).sum())
        acceptance.append(float((accepted >= d + 1).sum()) / reached if reached else 0.0)
    return TreeShape(
        widths=list(widths),
        nodes=tree_nodes(widths),
        expected_tokens=1.0 + float(accepted.float().mean()),
        step_s=cost.step(widths),
        acceptance=acceptance,
        positions=ranks.shape[0],
        plain_tokens_per_s=1.0 / cost.verify(1) if cost.verify(1) else 0.0,
        top1=[float(x) for x in (ranks == 0).float().mean(0)],
        cost=asdict(cost),
    )


def _width_sequences(max_depth: int, max_width: int, max_nodes: int) -> Iterator[tuple[int, ...]]:
    """Every non-increasing width sequence of depth 1..max_depth whose tree has at most max_nodes nodes."""

    def grow(prefix: tuple[int, ...], level: int, nodes: int) -> Iterator[tuple[int, ...]]:
        if prefix:
            yield prefix
        if len(prefix) == max_depth:
            return
        for w in range(1, (prefix[-1] if prefix else max_width) + 1):
            if nodes + level * w <= max_nodes:
                yield from grow((*prefix, w), level * w, nodes + level * w)

    yield from grow((), 1, 1)


def best_tree(ranks: Tensor, cost: TreeCost, *, max_width: int = 8, max_nodes: int = 64) -> TreeShape:
    """The static tree with the most expected tokens per second; depth at most the ranks' columns."""
    if ranks.ndim != 2 or ranks.shape[0] == 0 or ranks.shape[1] == 0:
        raise LinconvError("the tree-shape search needs ranks measured at one position or more, one depth or more")
    best, best_rate = None, -math.inf
    for widths in _width_sequences(ranks.shape[1], max_width, max_nodes):
        rate = (1.0 + float(accepted_depths(ranks, widths).float().mean())) / cost.step(widths)
        if rate > best_rate:
            best, best_rate = widths, rate
    return evaluate_tree(ranks, cost, best)


def continue_greedily(model: nn.Module, prompts: Tensor, new_tokens: int, batch: int = 16) -> Tensor:
    """[N, P + new_tokens]: each prompt of ``prompts`` [N, P] followed by the target's greedy continuation."""
    device = next(model.parameters()).device
    rows = []
    for s in range(0, prompts.shape[0], batch):
        part = prompts[s : s + batch].to(device)
        out = generate(model, part, max_new_tokens=new_tokens, stop_token_ids=(), ignore_context_limit=True)
        rows.append(torch.cat([part, torch.tensor(out.tokens, device=device)], 1))
    return torch.cat(rows)


@torch.inference_mode()
def measure_ranks(model: nn.Module, draft, sequences: Tensor, prompt_tokens: int, depth: int) -> Tensor:
    """[P, depth]: at every position of the continuations in ``sequences`` [N, T] (the target's own
    greedy tokens after ``prompt_tokens`` of prompt), the rank of the target's token among the draft's
    candidates at each depth, guessing along the true path. ``draft`` needs ``path_logits``."""
    if not hasattr(draft, "path_logits"):
        raise LinconvError(f"{type(draft).__name__} proposes no ranked candidates; its tree cannot be shaped")
    ranks = []
    for seq in sequences:
        features = model.base_model(input_ids=seq[None], use_cache=False).last_hidden_state[0]
        tokens = seq.tolist()
        if hasattr(draft, "advance"):
            draft.reset()  # a fresh state for each sequence
            draft.advance(tokens[:prompt_tokens], features[:prompt_tokens])
        for t in range(prompt_tokens, len(tokens) - depth):
            path = tokens[t + 1 : t + 1 + depth]
            logits = draft.path_logits(tokens[: t + 1], features[t - 1], path)
            ranks.append((logits > logits.gather(1, torch.tensor(path, device=logits.device)[:, None])).sum(1).cpu())
            if hasattr(draft, "advance"):
                draft.advance(tokens[t : t + 1], features[t : t + 1])
    if not ranks:
        raise LinconvError(f"the sequences are too short to measure {depth} draft depths after {prompt_tokens} prompt tokens")
    return torch.stack(ranks)


def _median_seconds(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        sync_device(device)
        start = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@torch.inference_mode()
def measure_cost(model: nn.Module, draft, prompt: Sequence[int], *, max_depth: int, repeats: int = 3) -> TreeCost:
    """Seconds to verify trees of COST_SIZES nodes after ``prompt``, and the draft's proposal cost
    (timed on COST_SHAPES no deeper than ``max_depth``, fitted as a + b·depth + c·nodes)."""
    device = next(model.parameters()).device
    cache = new_cache(model)
    features = model.base_model(input_ids=torch.tensor([list(prompt)], device=device), cache=cache, use_cache=True).last_hidden_state[0]
    g = torch.Generator().manual_seed(0)
    verify_s = {}
    for n in COST_SIZES:
        tree = CandidateTree(torch.randint(model.config.vocab_size, (n,), generator=g).tolist(), [-1] + [(i - 1) // 2 for i in range(1, n)])

        def run(tree=tree):
            verify(model, cache, tree, len(prompt))
            if isinstance(cache, DynamicCache):
                cache.crop(len(prompt))
            else:
                cache.rollback()  # no node accepted: every layer as after the prompt

        verify_s[n] = _median_seconds(run, device, repeats)
    shapes = [s for s in COST_SHAPES if len(s) <= max_depth]
    widths, rows, times = draft.widths, [], []
    for shape in shapes:
        draft.widths = list(shape)

        def run():
            if hasattr(draft, "advance"):
                draft.advance(prompt[-1:], features[-1:])
            draft.propose(list(prompt), features[-1])

        rows.append([1.0, len(shape), tree_nodes(shape) - 1])
        times.append(_median_seconds(run, device, repeats))
    draft.widths = widths
    if hasattr(draft, "reset"):
        draft.reset()
    fit = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)[:, None]).solution
    return TreeCost(verify_s, tuple(max(0.0, float(x)) for x in fit[:, 0]))


def spread_windows(tokenizer, text: str | None, split: str, count: int, length: int, skip: int = 0) -> Tensor:
    """``count`` windows [count, length] spread evenly over a text (None: the built-in ``split``),
    after its first ``skip`` tokens."""
    all_windows = windows(tokenize(tokenizer, load_text(text, split))[skip:], length)
    pick = torch.linspace(0, all_windows.shape[0] - 1, min(count, all_windows.shape[0])).round().long()
    return all_windows[pick]


def shape_tree(
    model: nn.Module, draft, prompts: Tensor, *, new_tokens: int = 64, depth: int = 6, max_width: int = 8, max_nodes: int = 64
) -> TreeShape:
    """Measure ``draft`` against ``model`` on the greedy continuations of ``prompts`` [N, P] and on
    this device's costs; the best static tree. The draft's state is reset afterwards."""
    sequences = continue_greedily(model, prompts, new_tokens)
    ranks = measure_ranks(model, draft, sequences, prompts.shape[1], depth)
    cost = measure_cost(model, draft, sequences[0].tolist(), max_depth=depth)
    return best_tree(ranks, cost, max_width=max_width, max_nodes=max_nodes)
