"""Speculative decoding: draft a tree, verify it in one pass, commit the accepted path.

Each step commits at least the target's own next token (the tree's root) plus every draft token
the target accepts: greedily (exact match, so the output is exactly greedy decoding's) or by
speculative sampling (the output follows the target's sampling distribution). Batch size 1.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from linconv.attention.state import new_cache
from linconv.errors import LinconvError
from linconv.generate import sync_device
from linconv.speculative.tree import CandidateTree
from linconv.speculative.verify import accept_greedy, accept_sampled, commit, verify


@dataclass
class SpecResult:
    tokens: list[int]  # generated tokens (prompt excluded)
    prefill_s: float
    decode_s: float
    steps: int
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per step (root excluded)
    offered: list[int] = field(default_factory=list)  # depth of the draft below the root, per step
    finish_reason: str = "length"

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.decode_s if self.decode_s else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return len(self.tokens) / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over the draft depth offered."""
        return sum(self.accepted) / sum(self.offered) if sum(self.offered) else 0.0

    @property
    def histogram(self) -> dict[int, int]:
        """Steps by number of draft tokens accepted."""
        return dict(sorted(Counter(self.accepted).items()))


@torch.inference_mode()
def speculative_generate(
    model: nn.Module,
    prompt: Sequence[int],
    draft,
    *,
    max_new_tokens: int = 128,
    stop_ids: Sequence[int] = (),
    prefill_chunk: int = 2048,
    sampler=None,
) -> SpecResult:
    """Decoding of ``prompt`` (token ids) with ``draft`` proposals; ``draft=None`` decodes through
    the same verification path with a one-node tree per step. Greedy by default (output identical to
    greedy decoding); with a ``linconv.generate.Sampler`` of temperature > 0, speculative sampling
    (``accept_sampled``): the tokens follow the sampler's distribution exactly."""
    sampling = sampler is not None and sampler.temperature > 0
    if not prompt:
        raise LinconvError("the prompt is empty")
    if max_new_tokens <= 0:
        raise LinconvError(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    cache = new_cache(model)
    sync_device(device)
    start = time.perf_counter()
    ids = torch.tensor([list(prompt)], device=device)
    advance = getattr(draft, "advance", None)  # drafts that read the target's hidden states (EAGLE)
    for s in range(0, ids.shape[1], prefill_chunk):
        hidden = model.base_model(input_ids=ids[:, s : s + prefill_chunk], cache=cache, use_cache=True).last_hidden_state[0]
        if advance is not None:
            advance(prompt[s : s + prefill_chunk], hidden)
    hidden = hidden[-1]
    logits: Tensor = model.get_output_embeddings()(hidden).float()
    sync_device(device)
    result = SpecResult([], time.perf_counter() - start, 0.0, 0)
    context, past, next_root = list(prompt), len(prompt), None
    start = time.perf_counter()
    while len(result.tokens) < max_new_tokens:
        if next_root is not None:
            root = next_root
        else:
            root = int(sampler.draw(sampler.probs(logits[None]))) if sampling else int(logits.argmax())
        paths = draft.propose([*context, root], hidden) if draft is not None else []
        left = max_new_tokens - len(result.tokens) - 1  # draft tokens that can still be used after the root
        paths = [p[:left] for p in paths if left > 0]  # nor may a node sit past the last position needed
        tree = CandidateTree.from_paths(root, paths)
        hiddens, tree_logits = verify(model, cache, tree, past)
        path, next_root = accept_sampled(tree, tree_logits, sampler) if sampling else (accept_greedy(tree, tree_logits), None)
        commit(model, cache, past, path)
        new = [tree.tokens[n] for n in path]
        if advance is not None:
            advance(new, hiddens[path])
        past += len(path)
        context += new
        hidden, logits = hiddens[path[-1]], tree_logits[path[-1]]
        result.steps += 1
        result.accepted.append(len(path) - 1)
        result.offered.append(max(tree.depths) - 1)
        for tok in new:
            result.tokens.append(tok)
            if tok in stop_ids:
                result.finish_reason = "stop"
                break
            if len(result.tokens) == max_new_tokens:
                break
        if result.finish_reason == "stop":
            break
    sync_device(device)
    result.decode_s = time.perf_counter() - start
    return result
