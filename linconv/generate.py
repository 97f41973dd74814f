"""Recurrent inference: chunked prefill, then token-by-token decoding, for linconv and softmax models.

One loop serves both kinds of model, so both are measured the same way. A linconv model decodes from
its ``LinconvCache`` (O(1) memory in the context length); an original softmax model from transformers'
``DynamicCache`` (grows with the context). The prompt goes through the model in chunks of
``prefill_chunk`` tokens carrying the state, asking for the logits of the last position only, so a long
prompt never materialises activations or full-vocabulary logits for all of its tokens at once.

Batches: a softmax model gets left-padded prompts with an attention mask. A linconv model never sees
padding (it would enter the recurrent state): prompts of equal length run as one batch; prompts of
different lengths run one after the other, each with its own state (the rows' group buffers differ
in length). Either way each row's tokens equal those of the prompt generated alone.

The engine returns tokens and timings and prints nothing; ``on_token`` streams.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from transformers import DynamicCache

from linconv.compiled import compiled_decode_step, decode_step
from linconv.errors import LinconvError
from linconv.models import position_limit
from linconv.models.hf import is_linconv
from linconv.sampling import Sampler

OnToken = Callable[[int, int, str], None]  # (row, token id, newly final text)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (a stop token, when hit, is the last one)
    texts: list[str] | None  # decoded generated text per prompt, cut before a stop string (needs a tokenizer)
    finish_reasons: list[str]  # per prompt: "stop_token", "stop_string", "max_new_tokens" or "context_limit"
    prompt_tokens: list[int]  # prompt length per prompt
    prefill_seconds: float  # prompt forward(s) plus the first sampled token
    token_seconds: list[float] = field(default_factory=list)  # one entry per decode step (a step serves all active rows)
    decode_tokens: int = 0  # tokens produced by the decode steps (the first token of each row comes from prefill)
    state_bytes_prefill: int = 0  # decoding state (linconv state or KV cache) after prefill, summed over rows
    state_bytes_end: int = 0
    logits: list[Tensor] | None = None  # keep_logits=True: [rows, V] per step (batched run) or per row and step

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.token_seconds)
        return self.decode_tokens / total if total else float("nan")


def context_limit(model) -> int | None:
    """Positions a model can use: a softmax model's trained context; None for a linconv model with
    rotary positions; absolute position embeddings (GPT-2) are a hard limit for both."""
    config = model.config
    if is_linconv(config):
        return position_limit(config)
    return getattr(config, "max_position_embeddings", None)


def state_nbytes(cache) -> int:
    """Bytes held by a decoding state: a LinconvCache or a transformers KV cache."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


class IncrementalDecoder:
    """Token ids in, text out as soon as it is final (multi-byte characters are never split)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read, self.text = tokenizer, [], 0, 0, ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)
        before, after = decode(self.ids[self.prefix : self.read]), decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        delta = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta


class _Row:
    """One prompt's output: tokens, text with stop-string hold-back, finish reason."""

    def __init__(self, tokenizer, stop_ids: set[int], stop_strings: list[str], budget: int, budget_reason: str):
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stop_ids, self.stop_strings, self.budget, self.budget_reason = stop_ids, stop_strings, budget, budget_reason
        self.tokens: list[int] = []
        self.emitted = 0  # characters of decoder.text handed to on_token
        self.finish: str | None = None
        self.text = ""

    def push(self, token: int) -> str:
        """Record a sampled token; returns the text that became final."""
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish = "stop_token"
        elif self.decoder is not None:
            old = len(self.decoder.text)
            self.decoder.push(token)
            text = self.decoder.text
            hits = [i for s in self.stop_strings if (i := text.find(s, max(0, old - len(s) + 1))) >= 0]
            if hits:
                self.finish, self.text = "stop_string", text[: min(hits)]
        if self.finish is None and len(self.tokens) >= self.budget:
            self.finish = self.budget_reason
        if self.decoder is None:
            return ""
        if self.finish is None:  # hold back a tail that may be the start of a stop string
            text = self.decoder.text
            held = max((n for s in self.stop_strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            self.text = text[: len(text) - held]
        elif self.finish != "stop_string":
            self.text = self.decoder.text
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings are true (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_rows(prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    if not prompts:
        raise LinconvError("the prompt is empty")
    return [list(map(int, p)) for p in prompts]


def check_options(
    max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, prefill_chunk: int = 2048
) -> None:
    """Raise LinconvError for generation options that cannot work (before any model is loaded)."""
    if max_new_tokens <= 0:
        raise LinconvError(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:  # also refuses nan
        raise LinconvError(f"--temperature must be >= 0 and finite (0 is greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise LinconvError(f"--top-k must be > 0, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise LinconvError(f"--top-p must be in (0, 1], got {top_p}")
    if prefill_chunk <= 0:
        raise LinconvError(f"--prefill-chunk must be > 0, got {prefill_chunk}")


def _check_prompts(rows: list[list[int]], model, ignore_limit: bool) -> None:
    for i, row in enumerate(rows):
        if not row:
            raise LinconvError("the prompt is empty" if len(rows) == 1 else f"prompt {i} is empty")
    limit = context_limit(model)
    longest = max(map(len, rows))
    if limit is not None and longest >= limit and not ignore_limit:
        raise LinconvError(
            f"the prompt has {longest} tokens but the model's context limit is {limit} tokens (max_position_embeddings); shorten it"
        )


class Decoder(Protocol):
    """How the tokens after the first are produced: plain decoding (one per row and step) here,
    speculative decoding (several per step) in ``linconv.speculative.decode``."""

    def begin(self, model, cache, sampler: Sampler, prompts: list[list[int]], hidden: Tensor, logits: Tensor, first: Tensor) -> None:
        """After prefill: the rows' prompts, last hidden states [B, hidden], logits [B, V] and the
        first tokens sampled from them [B] (emitted, not yet in the cache)."""

    def step(self, room: list[int]) -> list[list[int]]:
        """One step: each row's next tokens (at least one, at most ``room[row]``)."""

    # Optional: ``prefilled(ids, hiddens)`` sees each prefill chunk's ids [B, t] and last hidden
    # states [B, t, hidden] (an EAGLE draft reads the target's features from them).


class PlainDecoder:
    """One token per row and step: the newest tokens through ``step`` (the model, eager or compiled:
    :mod:`linconv.compiled`), the next ones sampled."""

    def __init__(self, mask: Tensor | None = None, keep_logits: bool = False, step=decode_step):
        self.mask, self.step_fn = mask, step  # mask: a left-padded softmax batch [B, T]
        self.kept: list[Tensor] | None = [] if keep_logits else None

    def begin(self, model, cache, sampler: Sampler, prompts: list[list[int]], hidden: Tensor, logits: Tensor, first: Tensor) -> None:
        self.model, self.cache, self.sampler, self.tokens = model, cache, sampler, first
        if self.mask is None:  # [B, 1]: the position of each row's newest token
            self.positions = torch.tensor([[len(p) - 1] for p in prompts], device=first.device)
        else:
            self.positions = self.mask.sum(-1, keepdim=True) - 1
        if self.kept is not None:
            self.kept.append(logits.float().cpu())

    def step(self, room: list[int]) -> list[list[int]]:
        self.positions = self.positions + 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        logits = self.step_fn(self.model, self.tokens[:, None], self.positions, self.cache, self.mask)
        self.tokens = self.sampler(logits)
        if self.kept is not None:
            self.kept.append(logits.float().cpu())
        return [[t] for t in self.tokens.tolist()]


def prefill(model, ids: Tensor, cache, chunk: int, mask: Tensor | None = None, positions: Tensor | None = None, on_chunk=None) -> Tensor:
    """Run ``ids`` [B, T] (left-padded where ``mask`` has zeros) through ``model`` into ``cache`` in
    chunks of ``chunk`` tokens; returns the last position's final hidden states [B, hidden].
    ``on_chunk(ids, hiddens)``, if given, sees each chunk's ids and hidden states [B, t, hidden]."""
    for s in range(0, ids.shape[1], chunk):
        e = min(s + chunk, ids.shape[1])
        extra = {} if mask is None else {"attention_mask": mask[:, :e], "position_ids": positions[:, s:e]}
        hidden = model.base_model(input_ids=ids[:, s:e], cache=cache, use_cache=True, **extra).last_hidden_state
        if on_chunk is not None:
            on_chunk(ids[:, s:e], hidden)
    return hidden[:, -1]


def _run(
    model, ids: Tensor, mask: Tensor | None, cache, prompts, rows: list[_Row], sampler: Sampler, chunk: int, on_token, offset: int, decoder
):
    """Prefill ``ids`` [B, T] (left-padded where ``mask`` has zeros) in chunks, then decode until every row finishes."""
    device = ids.device
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    sync_device(device)
    t0 = time.perf_counter()
    hidden = prefill(model, ids, cache, chunk, mask, positions, getattr(decoder, "prefilled", None))
    logits = model.get_output_embeddings()(hidden)
    tokens = sampler(logits)
    sync_device(device)
    prefill_s = time.perf_counter() - t0
    state_prefill = state_nbytes(cache)
    decoder.begin(model, cache, sampler, prompts, hidden, logits, tokens)
    new, step_times, decode_tokens = [[t] for t in tokens.tolist()], [], 0
    while True:
        for b, (row, row_tokens) in enumerate(zip(rows, new)):
            for token in row_tokens:
                if row.finish is None:
                    decode_tokens += bool(step_times)  # the first token of a row comes from prefill
                    text = row.push(token)
                    if on_token is not None:
                        on_token(offset + b, token, text)
        if all(r.finish is not None for r in rows):
            break
        t = time.perf_counter()
        new = decoder.step([r.budget - len(r.tokens) for r in rows])
        sync_device(device)
        step_times.append(time.perf_counter() - t)
    return prefill_s, step_times, decode_tokens, state_prefill, state_nbytes(cache)


def _groups(model, rows_ids: list[list[int]], rows: list[_Row], device):
    """(ids [B, T], attention mask or None, fresh cache, rows, index of the first row) per batch to run."""
    lengths = {len(r) for r in rows_ids}
    if not is_linconv(model.config):  # softmax: one left-padded batch
        T = max(lengths)
        ids = torch.tensor([[0] * (T - len(r)) + r for r in rows_ids], device=device)
        mask = None if len(lengths) == 1 else torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows_ids], device=device)
        yield ids, mask, DynamicCache(config=model.config), rows, 0
    elif len(lengths) == 1:  # linconv, equal lengths: one batch, no padding
        yield torch.tensor(rows_ids, device=device), None, model.new_cache(), rows, 0
    else:  # linconv, different lengths: one row at a time, each with its own state
        for i, (r, row) in enumerate(zip(rows_ids, rows)):
            yield torch.tensor([r], device=device), None, model.new_cache(), [row], i


def default_stop_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[int] | Sequence[Sequence[int]] | Tensor,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    prefill_chunk: int = 2048,
    on_token: OnToken | None = None,
    keep_logits: bool = False,
    ignore_context_limit: bool = False,
    decoder: Decoder | None = None,
    compile: bool = False,
) -> GenerationResult:
    """Generate from one prompt (a list of ids) or several (a list of lists, or a [B, T] tensor).

    ``stop_token_ids``: None means the model's eos ids; pass ``()`` for none. ``stop_strings`` and the
    streamed text need ``tokenizer``. ``on_token(row, token, text)`` is called for every generated token
    with the text that became final (text that may begin a stop string is held back until resolved).
    Sampling: ``temperature`` 0 is greedy (top-k / top-p then unused); ``seed`` makes sampling
    reproducible. A softmax model refuses prompts reaching its trained context (``ignore_context_limit``
    lets a benchmark go past it) and stops there. Errors in the arguments raise :class:`LinconvError`.

    Batches: prompts of different lengths are left-padded for a softmax model; a linconv model runs
    them one at a time, each row with its own state (its group buffer holds a different number of
    tokens), so per-step figures then cover one row at a time.

    ``decoder`` replaces plain decoding after the prefill (one prompt): speculative decoding is
    ``linconv.speculative.decode.SpeculativeDecoder(draft)``; stopping, streaming, limits and
    timings are the same. ``compile`` runs plain decoding steps through ``torch.compile``
    (:mod:`linconv.compiled`; the first steps then include compiling).
    """
    rows_ids = _as_rows(prompts)
    if decoder is not None and (len(rows_ids) > 1 or keep_logits):
        raise LinconvError("a custom decoder (speculative decoding) takes one prompt and keeps no logits")
    stop_strings = [s for s in stop_strings if s]
    check_options(max_new_tokens, temperature, top_k, top_p, prefill_chunk)
    if stop_strings and tokenizer is None:
        raise LinconvError("stop strings need a tokenizer")
    _check_prompts(rows_ids, model, ignore_context_limit)
    stop_ids = default_stop_ids(model) if stop_token_ids is None else set(stop_token_ids)
    limit = None if ignore_context_limit else context_limit(model)

    def new_row(n: int) -> _Row:
        if limit is not None and limit - n < max_new_tokens:
            return _Row(tokenizer, stop_ids, stop_strings, limit - n, "context_limit")
        return _Row(tokenizer, stop_ids, stop_strings, max_new_tokens, "max_new_tokens")

    device = next(model.parameters()).device
    sampler = Sampler(temperature, top_k, top_p, seed)
    rows = [new_row(len(r)) for r in rows_ids]
    result = GenerationResult([], None, [], [len(r) for r in rows_ids], 0.0, logits=[] if keep_logits else None)
    for ids, mask, cache, group_rows, offset in _groups(model, rows_ids, rows, device):
        plain = PlainDecoder(mask, keep_logits, compiled_decode_step() if compile else decode_step) if decoder is None else None
        prompts_of_group = rows_ids[offset : offset + len(group_rows)]
        prefill_s, times, n, state0, state1 = _run(
            model, ids, mask, cache, prompts_of_group, group_rows, sampler, prefill_chunk, on_token, offset, decoder or plain
        )
        result.prefill_seconds += prefill_s
        result.token_seconds += times
        result.decode_tokens += n
        result.state_bytes_prefill += state0
        result.state_bytes_end += state1
        if keep_logits:
            result.logits += plain.kept
    result.tokens = [r.tokens for r in rows]
    result.finish_reasons = [r.finish for r in rows]
    result.texts = [r.text for r in rows] if tokenizer is not None else None
    return result
