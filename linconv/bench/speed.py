"""Tokens per second: prefill and decode at several context lengths, through ``linconv.generate``.

For each context length C: a prompt of C tokens is prefilled in chunks (the engine's chunked prefill)
and then ``decode_tokens`` tokens are generated greedily, with no stop token. That is repeated
``repeats`` times. Reported per C:

- prefill tokens/s: C / prefill seconds, median over the repeats;
- decode tokens/s: 1 / the median time of one decode step, over every step of every repeat (a step
  at context C + i; the median shrugs off the odd step slowed by another process on the machine);
- the decoding state's size after the last step (KV cache for softmax, the fixed state for linconv).

One warm-up generation precedes the measurements (with ``compile``, it compiles the decode step:
:mod:`linconv.compiled`, the same for every model); CUDA work is synchronised before every clock read
(the engine does that). The prompt is a fixed pseudo-random token sequence: speed does not depend
on the content.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from linconv.bench.base import BenchInputs, per_role, ratio
from linconv.errors import LinconvError
from linconv.generate import generate
from linconv.progress import SILENT, Progress

if TYPE_CHECKING:  # run.py imports this module through the task registry
    from linconv.bench.run import BenchSettings


@dataclass
class SpeedPoint:
    context: int  # prompt tokens
    prefill_tokens_per_s: float  # median over repeats
    decode_tokens_per_s: float  # 1 / median step time
    decode_ms_per_token: float
    state_bytes: int  # decoding state at the end (KV cache or linconv state)
    prefill_seconds: list[float] = field(default_factory=list)  # every repeat
    repeats: int = 1


@dataclass
class SpeedResult:
    decode_tokens: int  # tokens generated per repeat
    prefill_chunk: int
    warmup: int  # warm-up generations run before measuring
    points: list[SpeedPoint] = field(default_factory=list)


def parse_contexts(text: str | Sequence[int]) -> list[int]:
    """``"256,2048,8192"`` -> [256, 2048, 8192]; LinconvError for anything else."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()] if isinstance(text, str) else [int(x) for x in text]
    except ValueError:
        raise LinconvError(f"--contexts takes comma-separated token counts, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise LinconvError(f"--contexts needs positive token counts, got {text!r}")
    return sorted(set(values))


@torch.inference_mode()
def speed(
    model: nn.Module,
    contexts: Sequence[int],
    *,
    decode_tokens: int = 16,
    repeats: int = 3,
    warmup: int = 1,
    prefill_chunk: int = 2048,
    seed: int = 0,
    compile: bool = False,
    progress: Progress = SILENT,
    task: str = "speed",
) -> SpeedResult:
    """Prefill and decode tokens/s of ``model`` at each context length (see the module docstring);
    ``progress`` hears of every repeat under the name ``task``."""
    if decode_tokens < 2:
        raise LinconvError(f"decode tokens must be at least 2 (the first comes from prefill), got {decode_tokens}")
    if repeats <= 0:
        raise LinconvError(f"repeats must be > 0, got {repeats}")
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (max(contexts),), generator=g).tolist()

    def run(n: int, new: int):
        return generate(
            model,
            prompt[:n],
            max_new_tokens=new,
            stop_token_ids=(),
            prefill_chunk=prefill_chunk,
            ignore_context_limit=True,
            compile=compile,
        )

    for _ in range(warmup):
        run(min(min(contexts), 128), 4)
    result = SpeedResult(decode_tokens, prefill_chunk, warmup)
    total, done = len(contexts) * repeats, 0
    progress.start(task, total)
    for n in contexts:
        prefill_s, steps, state = [], [], 0
        for _ in range(repeats):
            out = run(n, decode_tokens)
            prefill_s.append(out.prefill_seconds)
            steps += out.token_seconds
            state = out.state_bytes_end
            done += 1
            progress.update(task, done, total)
        step = statistics.median(steps)
        result.points.append(SpeedPoint(n, n / statistics.median(prefill_s), 1.0 / step, 1000.0 * step, state, prefill_s, repeats))
    progress.end(task)
    return result


# --- the ``speed`` bench task ---------------------------------------------------------------------


def run_speed(inputs: BenchInputs, s: BenchSettings, progress: Progress) -> dict[str, SpeedResult]:
    """Every model at the same context lengths: role -> result."""
    return {
        role: speed(
            model,
            s.contexts,
            decode_tokens=s.decode_tokens,
            repeats=s.repeats,
            prefill_chunk=s.prefill_chunk,
            compile=s.compile,
            progress=progress,
            task=f"speed · {role}",
        )
        for role, model in inputs.models.items()
    }


def speed_json(results: dict[str, SpeedResult], s: BenchSettings) -> dict:
    """The settings once, each role's points, and the ratios linearized ÷ original per context."""
    any_ = next(iter(results.values()))
    out = {
        "contexts": list(s.contexts),
        "decode_tokens": any_.decode_tokens,
        "repeats": s.repeats,
        "prefill_chunk": any_.prefill_chunk,
        "warmup": any_.warmup,
        **per_role(results, lambda r: [asdict(p) for p in r.points]),
    }
    out["ratio"] = [
        {
            "context": a["context"],
            "prefill": ratio(b["prefill_tokens_per_s"], a["prefill_tokens_per_s"]),
            "decode": ratio(b["decode_tokens_per_s"], a["decode_tokens_per_s"]),
        }
        for a, b in zip(out["original"] or [], out["linearized"] or [])
    ]
    return out
