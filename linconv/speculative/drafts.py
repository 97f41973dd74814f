"""Drafts: cheap guesses of the next few tokens, returned as continuation paths.

Every draft answers ``propose(context, hidden)``: ``context`` is the committed tokens plus the root
(the target's own next token), ``hidden`` the target's last hidden state [hidden] before the root.
It returns a list of token paths that continue the context; the caller merges them into a tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from linconv.attention.state import LinconvCache, new_cache
from linconv.data import same_tokenizer
from linconv.errors import LinconvError
from linconv.speculative.eagle import eagle_config, eagle_draft
from linconv.speculative.files import stored_widths
from linconv.speculative.medusa import MEDUSA_CONFIG, has_medusa, load_medusa
from linconv.speculative.shape import check_widths


class PromptLookup:
    """n-gram lookup in the context itself: where the last n tokens occurred before, propose what
    followed them (most recent matches first). No model, no training; strong on input-grounded text."""

    def __init__(self, num_tokens: int = 8, max_ngram: int = 3, max_candidates: int = 4):
        if num_tokens <= 0 or max_ngram <= 0 or max_candidates <= 0:
            raise LinconvError("prompt lookup needs positive --draft-tokens, n-gram size and tree width")
        self.num_tokens, self.max_ngram, self.max_candidates = num_tokens, max_ngram, max_candidates

    def propose(self, context: Sequence[int], hidden: Tensor | None = None) -> list[list[int]]:
        paths: list[list[int]] = []
        seq = torch.tensor(context)
        for n in range(min(self.max_ngram, len(context) - 1), 0, -1):
            tail = seq[-n:]
            starts = (seq[:-1].unfold(0, n, 1) == tail).all(1).nonzero().flatten().flip(0)  # newest first
            for s in starts.tolist():
                cont = context[s + n : s + n + self.num_tokens]
                if cont and cont not in paths:
                    paths.append(list(cont))
                if len(paths) == self.max_candidates:
                    return paths
            if paths:
                return paths
        return paths


class MedusaDraft:
    """Medusa heads: head i guesses the token i+1 places after the root from the target's hidden
    state; the tree takes the top ``widths[i]`` guesses at depth i (all combinations)."""

    def __init__(self, heads: nn.Module, widths: Sequence[int]):
        check_widths(widths, heads.head.weight.shape[0])
        if len(widths) > heads.num_heads:
            raise LinconvError(f"tree has {len(widths)} levels but the checkpoint has {heads.num_heads} Medusa heads")
        self.heads, self.widths = heads, list(widths)

    @torch.inference_mode()
    def propose(self, context: Sequence[int], hidden: Tensor | None = None) -> list[list[int]]:
        logits = self.heads(hidden[None])[: len(self.widths), 0]  # [depth, vocab]
        paths: list[list[int]] = [[]]
        for depth, width in enumerate(self.widths):
            top = logits[depth].topk(width).indices.tolist()
            paths = [[*p, t] for p in paths for t in top]
        return paths

    @torch.inference_mode()
    def path_logits(self, context: Sequence[int], hidden: Tensor, path: Sequence[int]) -> Tensor:
        """The heads' logits [len(path), V] (they read only ``hidden``): the tree-shape measurement."""
        return self.heads(hidden[None])[: len(path), 0].float()


class DraftModel:
    """A smaller model with the same tokenizer decodes ``num_tokens`` greedily from its own cache;
    the guesses are rolled back afterwards so that its cache holds only committed tokens."""

    def __init__(self, model: nn.Module, num_tokens: int = 4):
        if num_tokens <= 0:
            raise LinconvError("--draft-tokens must be > 0")
        self.model, self.num_tokens = model, num_tokens
        self.cache, self.seen = new_cache(model), 0

    @torch.inference_mode()
    def propose(self, context: Sequence[int], hidden: Tensor | None = None) -> list[list[int]]:
        device = next(self.model.parameters()).device
        committed = context[:-1]  # the root is the target's next token, certain but not yet committed
        if len(committed) > self.seen:
            self.model(torch.tensor([committed[self.seen :]], device=device), cache=self.cache, use_cache=True, logits_to_keep=1)
            self.seen = len(committed)
        snapshot = self.cache.snapshot() if isinstance(self.cache, LinconvCache) else None
        token, path = torch.tensor([[context[-1]]], device=device), []
        for _ in range(self.num_tokens):
            token = self.model(token, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            path.append(int(token))
        if snapshot is not None:
            self.cache.restore(snapshot)
        else:  # a transformers KV cache: crop takes the number of tokens to drop, negated
            self.cache.crop(self.seen - self.cache.get_seq_length())
        return [path]


def check_draft(spec: str, checkpoint: str | None, *, draft_tokens: int = 8, tree_widths: Sequence[int] | None = None) -> None:
    """The checks of :func:`make_draft` that need no model: a wrong draft fails before any loading."""
    if draft_tokens <= 0:
        raise LinconvError(f"--draft-tokens must be > 0, got {draft_tokens}")
    if tree_widths is not None and (not tree_widths or min(tree_widths) <= 0):
        raise LinconvError(f"--tree-widths must be positive per depth, got {list(tree_widths)}")
    if spec == "medusa":
        if checkpoint is None:
            raise LinconvError("--draft medusa needs a checkpoint fine-tuned with --medusa-heads")
        if not has_medusa(checkpoint):
            load_medusa(checkpoint)  # raises its one-line explanation before reading any weights
    elif spec == "eagle":
        if checkpoint is None:
            raise LinconvError("--draft eagle needs a checkpoint with an EAGLE head (linconv finetune --draft-head eagle)")
        eagle_config(checkpoint)  # raises its one-line explanation when there is no head
    elif spec == "model:":
        raise LinconvError("--draft model:PATH needs a PATH (a model folder, hub id or .gguf file)")
    elif spec != "lookup" and not spec.startswith("model:"):
        raise LinconvError(f"unknown draft {spec!r}; choose lookup, medusa, eagle or model:PATH")


def make_draft(
    spec: str, model: nn.Module, tokenizer, checkpoint: str | None, *, draft_tokens: int = 8, tree_widths: Sequence[int] | None = None
):
    """The draft named by ``spec``: ``lookup``, ``medusa`` (heads saved in ``checkpoint`` by
    ``linconv finetune --medusa-heads``), ``eagle`` (a head saved by ``--draft-head eagle``) or
    ``model:PATH`` (a linconv folder or any causal LM with the same tokenizer). ``tree_widths``
    None: the tree measured and stored with medusa/eagle drafts, else their default."""
    check_draft(spec, checkpoint, draft_tokens=draft_tokens, tree_widths=tree_widths)
    if spec == "lookup":
        return PromptLookup(num_tokens=draft_tokens, max_candidates=tree_widths[0] if tree_widths else 4)
    if spec == "medusa":
        heads = load_medusa(checkpoint, model)
        return MedusaDraft(heads, tree_widths or stored_widths(checkpoint, MEDUSA_CONFIG) or (4, 2, 2)[: heads.num_heads])
    if spec == "eagle":
        return eagle_draft(checkpoint, model, tree_widths)
    if spec.startswith("model:"):
        from linconv.checkpoint import linconv_config, load
        from linconv.models import ADAPTERS
        from linconv.sources import load_source

        path = spec.removeprefix("model:")
        device, dtype = next(model.parameters()).device, model.dtype
        loader = load if linconv_config(path) is not None else partial(load_source, supported=ADAPTERS)
        try:
            draft, draft_tokenizer = loader(path, dtype=dtype, device=device)
        except LinconvError as e:
            raise LinconvError(f"--draft {spec}: {e}") from None
        if draft_tokenizer is None or not same_tokenizer(tokenizer, draft_tokenizer):
            raise LinconvError(f"the draft model {path} does not use the target's tokenizer")
        sizes = draft.get_output_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0]
        if sizes[0] != sizes[1]:
            raise LinconvError(f"the draft model {path} has a vocabulary of {sizes[0]} tokens, the target {sizes[1]}; they must match")
    return DraftModel(draft, num_tokens=draft_tokens)
