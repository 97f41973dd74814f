"""``longppl``: perplexity by position over one long document, past the original's trained context.

The document (the bench's text, ``--text``: by default the held-out plays, ~180K tokens) is read once
from its start by chunked prefill: each chunk of ``chunk`` tokens goes through the decoder with the
cache of everything before it (a KV cache for the original, the fixed-size linear state for the
linearized model), and every position's next-token NLL is kept. Memory stays bounded by the chunk
(plus the original's KV cache, which grows by design), so 32K tokens run on a laptop CPU.

NLL is then averaged per position bucket: 0-1K, 1K-2K, 2K-4K, 4K-8K, … (doubling) up to the document's
end. The original SmolLM2 was trained on 8K positions: its buckets past 8K show where RoPE
extrapolation breaks; a linear-attention model that generalises stays flat.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linconv.attention.state import new_cache
from linconv.bench.base import ROLES, BenchInputs, position_limit_of
from linconv.errors import LinconvError
from linconv.generate import sync_device
from linconv.loss import model_parts
from linconv.progress import SILENT, Progress

if TYPE_CHECKING:  # run.py imports this module through the task registry
    from linconv.bench.run import BenchSettings

FIRST_BUCKET = 1024  # tokens in the first bucket; each later bucket doubles
CURVE_FIRST, CURVE_PER_OCTAVE = 64, 4  # the plotted curve: 0-64, then four points per doubling


@dataclass
class LongPplSettings:
    tokens: int = 32768  # length of the document read
    chunk: int = 2048  # tokens per prefill forward


@dataclass
class Bucket:
    start: int  # first position (inclusive); position p is the token predicted from positions < p
    end: int  # last position (exclusive)
    nll: dict[str, float] = field(default_factory=dict)  # role -> mean NLL (nats/token)

    @property
    def ratio(self) -> float | None:
        """linearized ÷ original perplexity in this bucket."""
        a, b = self.nll.get("linearized"), self.nll.get("original")
        return math.exp(a - b) if a is not None and b is not None else None


@dataclass
class LongPplResult:
    tokens: int  # document tokens read
    chunk: int
    trained_context: int | None  # the models' max_position_embeddings: positions seen in training
    buckets: list[Bucket] = field(default_factory=list)
    curve_ends: list[int] = field(default_factory=list)  # the curve's points: mean NLL over (previous end, end]
    curve: dict[str, list[float]] = field(default_factory=dict)  # role -> mean NLL per curve point
    seconds: dict[str, float] = field(default_factory=dict)


def long_perplexity_json(result: LongPplResult, s: BenchSettings | None = None) -> dict:
    """The bench JSON's ``long_perplexity`` part (:data:`SCHEMA`); the result holds every setting it needs."""
    return {
        "tokens": result.tokens,
        "chunk": result.chunk,
        "trained_context": result.trained_context,
        "buckets": [{"start": b.start, "end": b.end, **{r: _ppl(b.nll.get(r)) for r in ROLES}, "ratio": b.ratio} for b in result.buckets],
        "curve": {"ends": list(result.curve_ends), **{r: result.curve.get(r) for r in ROLES}},
        "seconds": {r: result.seconds.get(r) for r in ROLES},
    }


def _ppl(nll: float | None) -> dict | None:
    return None if nll is None else {"nll": nll, "perplexity": math.exp(nll)}


_NULLABLE_NUMBER = {"type": ["number", "null"]}
_FIGURES = {
    "type": ["object", "null"],
    "required": ["nll", "perplexity"],
    "properties": {"nll": {"type": "number"}, "perplexity": {"type": "number"}},
}
_CURVE = {"type": ["array", "null"], "items": {"type": "number"}}
# The JSON of long_perplexity_json (JSON Schema); the bench JSON's "long_perplexity" key.
SCHEMA = {
    "type": "object",
    "required": ["tokens", "chunk", "trained_context", "buckets", "curve", "seconds"],
    "properties": {
        "tokens": {"type": "integer"},
        "chunk": {"type": "integer"},
        "trained_context": {"type": ["integer", "null"]},
        "buckets": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["start", "end", *ROLES, "ratio"],
                "properties": {"start": {"type": "integer"}, "end": {"type": "integer"}, "ratio": _NULLABLE_NUMBER}
                | dict.fromkeys(ROLES, _FIGURES),
            },
        },
        "curve": {
            "type": "object",
            "required": ["ends", *ROLES],
            "properties": {"ends": {"type": "array", "items": {"type": "integer"}}} | dict.fromkeys(ROLES, _CURVE),
        },
        "seconds": {"type": "object", "required": list(ROLES), "additionalProperties": _NULLABLE_NUMBER},
    },
}


def bucket_edges(tokens: int, first: int = FIRST_BUCKET, per_octave: int = 1) -> list[tuple[int, int]]:
    """[(0, first), (first, 2·first), (2·first, 4·first), …] cut at ``tokens`` (the last may be short);
    ``per_octave`` > 1 splits each doubling into that many log-spaced buckets."""
    if tokens < 2 or first <= 0 or per_octave <= 0:
        raise LinconvError(f"position buckets need at least 2 tokens and a first bucket > 0, got {tokens} and {first}")
    ends, k = [], 0
    while not ends or ends[-1] < tokens:
        end = min(round(first * 2 ** (k / per_octave)), tokens)
        if not ends or end > ends[-1]:
            ends.append(end)
        k += 1
    return list(zip([0, *ends[:-1]], ends))


def bucket_means(nll: Tensor, edges: list[tuple[int, int]]) -> list[float]:
    """Mean of ``nll`` [T] (nll[p]: the loss of predicting token p; nll[0] is not a prediction) per bucket."""
    means = []
    for start, end in edges:
        values = nll[max(start, 1) : end]
        if values.numel() == 0:
            raise LinconvError(f"position bucket {start}-{end} holds no predicted token")
        means.append(values.double().mean().item())
    return means


@torch.inference_mode()
def position_nll(model: nn.Module, ids: Tensor, chunk: int, on_chunk=None) -> Tensor:
    """NLL of every token of ``ids`` [T] given all tokens before it: [T] (fp32; entry 0 is 0).

    Chunked prefill: each chunk's hidden states come from one decoder forward on top of the cache of
    the chunks before; the head and the cross-entropy run on those states only.
    """
    if chunk <= 0:
        raise LinconvError(f"--prefill-chunk must be > 0, got {chunk}")
    device = next(model.parameters()).device
    decoder, head = model_parts(model)
    cache = new_cache(model)
    ids = ids.to(device)
    T = ids.numel()
    out = torch.zeros(T, dtype=torch.float32)
    for s in range(0, T - 1, chunk):
        e = min(s + chunk, T - 1)  # positions s..e-1 predict tokens s+1..e
        hidden = decoder(input_ids=ids[None, s:e], cache=cache, use_cache=True).last_hidden_state[0]  # [e-s, d]
        for a in range(s, e, 256):  # logits 256 rows at a time: never [chunk, vocab] at once
            b = min(a + 256, e)
            logits = head(hidden[a - s : b - s]).float()
            out[a + 1 : b + 1] = F.cross_entropy(logits, ids[a + 1 : b + 1], reduction="none").cpu()
        if on_chunk is not None:
            on_chunk(e + 1, T)
    return out


def check_document(models: Iterable[nn.Module], available: int, tokens: int) -> None:
    """LinconvError unless ``tokens`` positions of a document of ``available`` tokens can be read by every model."""
    if tokens < 2:
        raise LinconvError(f"--long-tokens must be at least 2, got {tokens}")
    if available < tokens:
        raise LinconvError(f"the long document has {available:,} tokens, fewer than --long-tokens {tokens:,}")
    limit = position_limit_of(models)
    if limit is not None and tokens > limit:
        raise LinconvError(f"the models have absolute position embeddings for {limit:,} positions; pass --long-tokens <= {limit:,}")


def long_perplexity(
    models: dict[str, tuple[nn.Module, object]], document: Tensor, settings: LongPplSettings, progress: Progress = SILENT
) -> LongPplResult:
    """NLL by position bucket of each model in ``models`` (role -> (model, tokenizer)) over the first
    ``settings.tokens`` tokens of ``document`` [N] (token ids)."""
    check_document((m for m, _ in models.values()), document.numel(), settings.tokens)
    ids = document[: settings.tokens]
    edges = bucket_edges(settings.tokens)
    trained = getattr(next(iter(models.values()))[0].config, "max_position_embeddings", None)
    result = LongPplResult(settings.tokens, settings.chunk, trained, [Bucket(s, e) for s, e in edges])
    for role, (model, _) in models.items():
        label = f"long perplexity · {role}"
        progress.start(label, settings.tokens)
        device = next(model.parameters()).device
        sync_device(device)
        t0 = time.perf_counter()
        nll = position_nll(model, ids, settings.chunk, lambda done, total, label=label: progress.update(label, done, total))
        sync_device(device)
        result.seconds[role] = time.perf_counter() - t0
        progress.end(label)
        for bucket, mean in zip(result.buckets, bucket_means(nll, edges)):
            bucket.nll[role] = mean
        curve_edges = bucket_edges(settings.tokens, CURVE_FIRST, CURVE_PER_OCTAVE)
        result.curve_ends, result.curve[role] = [e for _, e in curve_edges], bucket_means(nll, curve_edges)
    return result


# --- the ``longppl`` bench task -------------------------------------------------------------------


def check_longppl(inputs: BenchInputs, s: BenchSettings) -> None:
    """Before any task runs: the text is long enough and every model takes ``--long-tokens`` positions."""
    check_document(inputs.models.values(), inputs.tokens.numel(), s.long_tokens)


def run_longppl(inputs: BenchInputs, s: BenchSettings, progress: Progress) -> LongPplResult:
    """Every model over the same first ``--long-tokens`` tokens of the text, prefilled ``--prefill-chunk`` at a time."""
    return long_perplexity(inputs.with_tokenizer(), inputs.tokens, LongPplSettings(s.long_tokens, s.prefill_chunk), progress)
