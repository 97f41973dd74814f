"""Speculative decoding measured: tokens/s with and without, acceptance, identical greedy output.

Two prompt kinds: *grounded* (the model is asked to continue a passage it has just seen, so the
continuation is in its context: prompt lookup can guess it) and *open* (a plain continuation of
held-out text, where guessing rarely works). Plain decoding is linconv's engine (greedy); the
speculative run uses the same model through tree verification.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from torch import nn

from linconv.bench.base import BenchInputs, position_limit_of
from linconv.errors import LinconvError
from linconv.generate import generate
from linconv.progress import Progress
from linconv.speculative.decode import speculative_generate
from linconv.speculative.drafts import PromptLookup

if TYPE_CHECKING:  # run.py imports this module through the task registry
    from linconv.bench.run import BenchSettings


@dataclass
class SpecPoint:
    model: str  # "original" or "linearized"
    prompt: str  # "grounded" or "open"
    prompt_tokens: int
    new_tokens: int
    plain_tokens_per_s: float
    spec_tokens_per_s: float
    acceptance_rate: float  # draft tokens accepted / draft depth offered
    mean_tokens_per_step: float
    histogram: dict[int, int]  # steps by draft tokens accepted
    identical: bool  # speculative greedy output == plain greedy output

    @property
    def speedup(self) -> float:
        return self.spec_tokens_per_s / self.plain_tokens_per_s if self.plain_tokens_per_s else float("nan")

    def to_dict(self) -> dict:
        return asdict(self) | {"speedup": self.speedup}


SPEC_PASSAGE = 384  # tokens of the passage of the speculative-decoding prompts


def spec_prompts(tokens: list[int], length: int = SPEC_PASSAGE) -> dict[str, list[int]]:
    """Token prompts from held-out text: a passage followed by its own first half (grounded), and
    the next stretch of text alone (open)."""
    length = min(length, len(tokens) // 2)
    if length < 2:
        raise LinconvError(f"the text has {len(tokens)} tokens, too few for speculative-decoding prompts")
    passage = tokens[:length]
    return {"grounded": passage + passage[: length // 2], "open": tokens[length : 2 * length]}


def spec_decode_point(model: nn.Module, name: str, kind: str, prompt: list[int], draft, new_tokens: int) -> SpecPoint:
    """One model on one prompt: plain greedy vs speculative greedy (after a short warm-up of each)."""
    generate(model, prompt, max_new_tokens=2, stop_token_ids=(), ignore_context_limit=True)
    plain = generate(model, prompt, max_new_tokens=new_tokens, stop_token_ids=(), ignore_context_limit=True)
    spec = speculative_generate(model, prompt, draft, max_new_tokens=new_tokens)
    return SpecPoint(
        model=name,
        prompt=kind,
        prompt_tokens=len(prompt),
        new_tokens=new_tokens,
        plain_tokens_per_s=plain.decode_tokens_per_s,
        spec_tokens_per_s=spec.tokens_per_s,
        acceptance_rate=spec.acceptance_rate,
        mean_tokens_per_step=spec.mean_tokens_per_step,
        histogram=spec.histogram,
        identical=spec.tokens == plain.tokens[0],
    )


# --- the ``spec`` bench task ----------------------------------------------------------------------


def run_spec(inputs: BenchInputs, s: BenchSettings, progress: Progress) -> list[SpecPoint]:
    """Every model on both prompt kinds, drafting by prompt lookup: one point per model and kind."""
    limit = position_limit_of(inputs.models.values())
    passage = SPEC_PASSAGE if limit is None else min(SPEC_PASSAGE, (limit - s.spec_tokens) * 2 // 3)  # grounded: 1.5 passages
    prompts = spec_prompts(inputs.tokens.tolist(), passage)
    points = []
    for role, model in inputs.models.items():
        task = f"speculative · {role}"
        progress.start(task, len(prompts))
        for i, (kind, prompt) in enumerate(prompts.items()):
            progress.update(task, i, detail=kind)
            points.append(spec_decode_point(model, role, kind, prompt, PromptLookup(num_tokens=8, max_candidates=4), s.spec_tokens))
        progress.update(task, len(prompts), detail="done")
        progress.end(task)
    return points


def spec_json(points: list[SpecPoint], s: BenchSettings) -> list[dict] | None:
    return [p.to_dict() for p in points] or None
