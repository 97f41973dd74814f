"""Speculative decoding measured: tokens/s with and without, acceptance, identical greedy output.

Two prompt kinds: *grounded* (the model is asked to continue a passage it has just seen, so the
continuation is in its context: prompt lookup can guess it) and *open* (a plain continuation of
held-out text, where guessing rarely works). Plain decoding is linconv's engine (greedy), measured
once per model and prompt; every draft (lookup, Medusa heads, the EAGLE head, a draft model) then
runs through tree verification with the same model and prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from linconv.bench.base import BenchInputs, position_limit_of
from linconv.errors import LinconvError
from linconv.generate import generate
from linconv.progress import Progress
from linconv.speculative.decode import speculative_generate
from linconv.speculative.drafts import check_draft, make_draft
from linconv.speculative.eagle import has_eagle
from linconv.speculative.medusa import has_medusa

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
    draft: str = "lookup"
    acceptance_by_depth: list[float] = field(default_factory=list)  # depth d accepted / steps that reached d − 1 and offered d

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


def draft_factories(model: nn.Module, tokenizer, checkpoint: str | None, specs: Sequence[str] = ("auto",)) -> dict[str, Callable]:
    """Name -> a function making a fresh draft, for every draft of ``specs`` (names for
    :func:`~linconv.speculative.drafts.make_draft`; ``auto``: lookup, plus the Medusa heads and the
    EAGLE head saved in ``checkpoint`` when there are any)."""
    names: list[str] = []
    for spec in specs:
        if spec == "auto":
            names += [
                "lookup",
                *(["medusa"] if checkpoint and has_medusa(checkpoint) else []),
                *(["eagle"] if has_eagle(checkpoint) else []),
            ]
        elif spec not in names:
            names.append(spec)
    factories = {name: partial(make_draft, name, model, tokenizer, checkpoint) for name in dict.fromkeys(names)}
    for make in factories.values():
        make()  # a draft that cannot be made fails before anything is measured
    return factories


def acceptance_by_depth(accepted: Sequence[int], offered: Sequence[int]) -> list[float]:
    """Per draft depth d: steps that accepted d tokens among the steps that accepted d − 1 and offered d."""
    rates = []
    for d in range(1, max(offered, default=0) + 1):
        reached = sum(1 for a, o in zip(accepted, offered) if a >= d - 1 and o >= d)
        rates.append(sum(1 for a in accepted if a >= d) / reached if reached else 0.0)
    return rates


def spec_decode_points(
    model: nn.Module, name: str, kind: str, prompt: list[int], drafts: dict[str, Callable], new_tokens: int
) -> list[SpecPoint]:
    """One model on one prompt: plain greedy once, then speculative greedy with each draft (a fresh
    one from its factory), each after a short warm-up."""
    generate(model, prompt, max_new_tokens=2, stop_token_ids=(), ignore_context_limit=True)
    plain = generate(model, prompt, max_new_tokens=new_tokens, stop_token_ids=(), ignore_context_limit=True)
    points = []
    for draft_name, make in drafts.items():
        speculative_generate(model, prompt, make(), max_new_tokens=2, ignore_context_limit=True)
        spec = speculative_generate(model, prompt, make(), max_new_tokens=new_tokens, ignore_context_limit=True)
        points.append(
            SpecPoint(
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
                draft=draft_name,
                acceptance_by_depth=acceptance_by_depth(spec.accepted, spec.offered),
            )
        )
    return points


def spec_decode_point(
    model: nn.Module, name: str, kind: str, prompt: list[int], draft, new_tokens: int, draft_name: str = "lookup"
) -> SpecPoint:
    """One model on one prompt with one draft instance: plain greedy vs speculative greedy."""
    return spec_decode_points(model, name, kind, prompt, {draft_name: lambda: draft}, new_tokens)[0]


# --- the ``spec`` bench task ----------------------------------------------------------------------


def check_spec(inputs: BenchInputs, s: BenchSettings) -> None:
    """Before the first task: every draft of ``--spec-drafts`` can be made (LinconvError if not)."""
    if not s.spec_drafts:
        raise LinconvError("--spec-drafts names no draft; choose auto, lookup, medusa, eagle or model:PATH")
    for name in s.spec_drafts:
        if name != "auto":
            check_draft(name, inputs.sources.get("linearized"))


def run_spec(inputs: BenchInputs, s: BenchSettings, progress: Progress) -> list[SpecPoint]:
    """Every model on both prompt kinds with every draft of ``s.spec_drafts``: one point per model,
    kind and draft. Medusa and EAGLE heads belong to the checkpoint they were trained for, so only
    the linearized model drafts with them."""
    limit = position_limit_of(inputs.models.values())
    passage = SPEC_PASSAGE if limit is None else min(SPEC_PASSAGE, (limit - s.spec_tokens) * 2 // 3)  # grounded: 1.5 passages
    prompts = spec_prompts(inputs.tokens.tolist(), passage)
    points = []
    for role, model in inputs.models.items():
        task = f"speculative · {role}"
        progress.start(task, len(prompts))
        own = role == "linearized"
        names = [d for d in s.spec_drafts if own or d not in ("medusa", "eagle")]
        drafts = draft_factories(model, inputs.tokenizer, inputs.sources.get("linearized") if own else None, names)
        for i, (kind, prompt) in enumerate(prompts.items()):
            progress.update(task, i, detail=f"{kind}: {', '.join(drafts)}")
            points += spec_decode_points(model, role, kind, prompt, drafts, s.spec_tokens)
        progress.update(task, len(prompts), detail="done")
        progress.end(task)
    return points


def spec_json(points: list[SpecPoint], s: BenchSettings) -> list[dict] | None:
    return [p.to_dict() for p in points] or None
