"""Speculative decoding: draft a tree, verify it in one pass, commit the accepted path.

A :class:`SpeculativeDecoder` plugs into the decode engine (``linconv.generate.generate(...,
decoder=...)``), which does the prefill, stop tokens and strings, streaming, context limits and
timings exactly as for plain decoding. Each step takes the newest token (already emitted, not yet in
the cache) as the root of a tree of draft guesses, verifies the tree in one forward, commits the
root and the accepted guesses to the cache, and emits the accepted guesses plus the token that
follows them: greedily (exact match, so the output is exactly greedy decoding's) or by speculative
sampling (the output follows the target's sampling distribution). With no draft (or no guess) a
step is one plain decoding step through the verification path. Batch size 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from linconv.generate import GenerationResult, Sampler, generate
from linconv.speculative.tree import CandidateTree
from linconv.speculative.verify import accept_greedy, accept_sampled, commit, verify


@dataclass
class SpecResult:
    generation: GenerationResult  # the engine's result (tokens, texts, finish reason, timings)
    steps: int
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per step
    offered: list[int] = field(default_factory=list)  # depth of the draft below the root, per step

    @property
    def tokens(self) -> list[int]:
        return self.generation.tokens[0]

    @property
    def finish_reason(self) -> str:
        return self.generation.finish_reasons[0]

    @property
    def prefill_s(self) -> float:
        return self.generation.prefill_seconds

    @property
    def decode_s(self) -> float:
        return sum(self.generation.token_seconds)

    @property
    def tokens_per_s(self) -> float:
        """Tokens of the decode steps per second (the first token comes from the prefill), as plain decoding's figure."""
        return self.generation.decode_tokens_per_s

    @property
    def mean_tokens_per_step(self) -> float:
        return self.generation.decode_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over the draft depth offered."""
        return sum(self.accepted) / sum(self.offered) if sum(self.offered) else 0.0

    @property
    def histogram(self) -> dict[int, int]:
        """Steps by number of draft tokens accepted."""
        return dict(sorted(Counter(self.accepted).items()))


class SpeculativeDecoder:
    """The engine's decoder for speculative decoding with ``draft`` (None: one-node trees).

    A draft answers ``propose(context, hidden)`` with continuation paths of ``context`` (committed
    tokens plus the root); ``hidden`` is the target's last hidden state before the root.
    """

    def __init__(self, draft=None):
        self.draft = draft
        self.advance = getattr(draft, "advance", None)  # drafts that read the target's hidden states (EAGLE)

    def prefilled(self, ids: Tensor, hiddens: Tensor) -> None:
        """A prefill chunk went through the target: ``ids`` [1, T] and its last hidden states [1, T, D]."""
        if self.advance is not None:
            self.advance(ids[0].tolist(), hiddens[0])

    def begin(self, model, cache, sampler: Sampler, prompts: list[list[int]], hidden: Tensor, logits: Tensor, first: Tensor) -> None:
        self.model, self.cache, self.sampler = model, cache, sampler
        self.context, self.hidden, self.root = list(prompts[0]), hidden[0], int(first[0])
        self.steps, self.accepted, self.offered = 0, [], []

    def step(self, room: list[int]) -> list[list[int]]:
        """Verify the root and the draft's guesses after it; returns the accepted guesses and the
        token after them (guesses are cut so that at most ``room`` tokens come out)."""
        paths = self.draft.propose([*self.context, self.root], self.hidden) if self.draft is not None and room[0] > 1 else []
        tree = CandidateTree.from_paths(self.root, [p[: room[0] - 1] for p in paths])
        past = len(self.context)
        hiddens, logits = verify(self.model, self.cache, tree, past)
        if self.sampler.temperature > 0:
            path, after = accept_sampled(tree, logits, self.sampler)
        else:
            path = accept_greedy(tree, logits)
            after = int(logits[path[-1]].argmax())
        commit(self.model, self.cache, past, path)
        new = [tree.tokens[n] for n in path]
        if self.advance is not None:
            self.advance(new, hiddens[path])
        self.context += new
        self.hidden, self.root = hiddens[path[-1]], after
        self.steps += 1
        self.accepted.append(len(path) - 1)
        self.offered.append(max(tree.depths) - 1)
        return [[*new[1:], after]]

    def result(self, generation: GenerationResult) -> SpecResult:
        """The engine's result with this decoder's statistics."""
        return SpecResult(generation, self.steps, self.accepted, self.offered)


def speculative_generate(
    model: nn.Module, prompt: Sequence[int], draft, *, max_new_tokens: int = 128, stop_ids: Sequence[int] = (), sampler=None, **options
) -> SpecResult:
    """Decoding of ``prompt`` (token ids) with ``draft`` proposals through the engine; ``draft=None``
    decodes through the same verification path with a one-node tree per step. Greedy by default
    (output identical to greedy decoding); with a ``linconv.generate.Sampler`` of temperature > 0,
    speculative sampling (``accept_sampled``): the tokens follow the sampler's distribution exactly.
    ``options`` go to :func:`linconv.generate.generate` (stop strings, tokenizer, on_token, ...)."""
    sampler = sampler or Sampler()
    decoder = SpeculativeDecoder(draft)
    result = generate(
        model,
        list(prompt),
        max_new_tokens=max_new_tokens,
        temperature=sampler.temperature,
        top_k=sampler.top_k,
        top_p=sampler.top_p,
        seed=sampler.seed,
        stop_token_ids=stop_ids,
        decoder=decoder,
        **options,
    )
    return decoder.result(result)
