"""Candidate trees: the tokens a draft proposes, shaped as a tree rooted at the next token.

Node 0 is always the target model's own greedy next token (known from the last verification),
so every step commits at least one token; the draft's guesses hang below it. ``parents[n]`` is
the index of node n's parent (−1 for the root), parents before children.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from linconv.ops import tree_depths


@dataclass(frozen=True)
class CandidateTree:
    tokens: list[int]
    parents: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> list[int]:
        return tree_depths(self.parents)

    def children(self, node: int) -> dict[int, int]:
        """token -> child index of ``node``."""
        return {self.tokens[c]: c for c, p in enumerate(self.parents) if p == node}

    @classmethod
    def from_paths(cls, root: int, paths: Sequence[Sequence[int]]) -> CandidateTree:
        """A trie of draft continuations below ``root``: shared prefixes become shared nodes."""
        tokens, parents = [root], [-1]
        index: dict[tuple[int, int], int] = {}
        for path in paths:
            node = 0
            for tok in path:
                if (node, tok) not in index:
                    index[(node, tok)] = len(tokens)
                    tokens.append(int(tok))
                    parents.append(node)
                node = index[(node, tok)]
        return cls(tokens, parents)
