"""Maximum sequence length that fits a memory budget, found by doubling then bisection.

Two modes, each searched separately:

- ``forward``: one forward over the whole sequence, exactly as perplexity does it (hidden states,
  then the chunked loss; no cache);
- ``generate``: chunked prefill of the sequence through the decode engine (``linconv.generate``),
  then a few generated tokens; the length counts prompt + generated tokens.

The search (:func:`search_max_length`) is a pure function over ``trial(n) -> Trial``; the trials
themselves run in :mod:`linconv.bench.trials` (a child process per trial on CPU, in process on CUDA).

Lengths grow monotonically in cost, so ``max_length`` passed, ``first_failure`` failed, and the
gap between them is at most ``granularity``. ``bound`` says what stopped the search: ``memory``,
``time`` or ``cap`` (every length up to the cap passed).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from linconv.bench.base import BenchInputs, per_role, ratio, weights_bytes
from linconv.bench.trials import GIB, MEMORY, MODES, OK, TIME, CudaTrial, ProcessTrial, Trial, cuda_budget
from linconv.errors import LinconvError
from linconv.progress import Progress

if TYPE_CHECKING:  # run.py imports this module through the task registry
    from linconv.bench.run import BenchSettings

CAP = "cap"


@dataclass
class SearchResult:
    max_length: int  # the longest length that passed (0: none did)
    bound: str  # "memory", "time" or "cap"
    first_failure: int | None  # the shortest length that failed (None when bound is "cap")
    trials: list[Trial] = field(default_factory=list)


@dataclass
class MaxLenResult:
    mode: str  # "forward" or "generate"
    max_length: int
    bound: str
    first_failure: int | None
    granularity: int
    cap: int
    timeout_s: float
    budget_bytes: int | None  # None on CUDA without --memory-budget: the device memory
    loaded_bytes: int | None  # memory with the model loaded, before any work (CPU: RSS of the child)
    new_tokens: int  # generated tokens in ``generate`` mode (part of the length)
    trials: list[Trial] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.trials)


def search_max_length(
    trial: Callable[[int], Trial | str],
    *,
    start: int,
    cap: int,
    granularity: int,
    min_length: int = 1,
) -> SearchResult:
    """Double from ``start`` until a trial fails or ``cap`` passes, then bisect to ``granularity``.

    ``trial(n)`` returns a :class:`Trial` or just its outcome ("ok", "memory", "time"). Lengths
    tried during bisection are ``lo`` plus multiples of ``granularity``; when even ``start`` fails
    the search bisects down towards ``min_length``.
    """
    if granularity <= 0 or start <= 0 or cap <= 0:
        raise LinconvError(f"start, cap and granularity must be > 0 (got {start}, {cap}, {granularity})")
    trials: list[Trial] = []

    def run(n: int) -> str:
        r = trial(n)
        r = Trial(n, r) if isinstance(r, str) else r
        if r.outcome not in (OK, MEMORY, TIME):
            raise ValueError(f"trial outcome must be ok, memory or time, got {r.outcome!r}")
        trials.append(r)
        return r.outcome

    lo, hi, bound = 0, None, CAP
    n = min(start, cap)
    while True:
        outcome = run(n)
        if outcome != OK:
            hi, bound = n, outcome
            break
        lo = n
        if n >= cap:
            break
        n = min(2 * n, cap)
    if hi is not None:
        while hi - lo > granularity:
            mid = lo + max(granularity, (hi - lo) // 2 // granularity * granularity)
            if lo == 0 and mid < min_length:
                break
            outcome = run(mid)
            if outcome == OK:
                lo = mid
            else:
                hi, bound = mid, outcome
    return SearchResult(lo, bound, hi, trials)


def max_length(
    trial: Callable[[int], Trial],
    mode: str,
    *,
    start: int,
    cap: int,
    granularity: int,
    timeout_s: float,
    budget_bytes: int | None,
    new_tokens: int = 8,
) -> MaxLenResult:
    """Search with ``trial`` (a :class:`ProcessTrial` or :class:`CudaTrial`) and package the result."""
    found = search_max_length(trial, start=start, cap=cap, granularity=granularity, min_length=new_tokens + 1 if mode == "generate" else 2)
    return MaxLenResult(
        mode,
        found.max_length,
        found.bound,
        found.first_failure,
        granularity,
        cap,
        timeout_s,
        budget_bytes,
        getattr(trial, "loaded_bytes", None),
        new_tokens if mode == "generate" else 0,
        found.trials,
    )


# --- the ``maxlen`` bench task --------------------------------------------------------------------


def check_budget(inputs: BenchInputs, s: BenchSettings) -> None:
    """Before any task runs: a budget below a model's weights, or above the device's memory, is an error."""
    if s.memory_budget_gib is None:
        return
    budget = int(s.memory_budget_gib * GIB)
    for role, model in reversed(inputs.models.items()):  # the linearized model, the one under test, first
        if weights_bytes(model) >= budget:
            raise LinconvError(
                f"--memory-budget {s.memory_budget_gib:g} GiB is smaller than the "
                f"{role} model: its weights alone are {weights_bytes(model) / GIB:.2f} GiB"
            )
    if inputs.device.type == "cuda" and budget > torch.cuda.get_device_properties(inputs.device).total_memory:
        raise LinconvError(f"--memory-budget {s.memory_budget_gib:g} GiB is more than the device's memory")


def _model_folder(model: nn.Module, given: str | None, stack: ExitStack) -> str:
    """A folder a trial child can load ``model`` from: ``given`` when it is one, else a temporary save."""
    if given is not None and Path(given).is_dir() and (Path(given) / "config.json").is_file():
        return given
    tmp = tempfile.mkdtemp(prefix="linconv-bench-")
    stack.callback(shutil.rmtree, tmp, True)
    model.save_pretrained(tmp, safe_serialization=True)
    return tmp


def run_maxlen(inputs: BenchInputs, s: BenchSettings, progress: Progress) -> dict[str, dict[str, MaxLenResult]]:
    """Every model in both modes, each alone under the budget: mode -> role -> result."""
    budget = None if s.memory_budget_gib is None else int(s.memory_budget_gib * GIB)
    cuda = inputs.device.type == "cuda"
    models, results = inputs.models, {}
    with ExitStack() as stack:
        if cuda:
            cuda_budget(inputs.device, budget)
            stack.callback(cuda_budget, inputs.device, None)
        else:
            progress.message("saving the models for the max-length trial processes…")
            folders = {role: _model_folder(m, inputs.sources.get(role), stack) for role, m in models.items()}
        for role, model in models.items():
            with ExitStack() as alone:
                if cuda:  # the budget is this model's alone: park the others in CPU memory
                    for other in (m for r, m in models.items() if r != role):
                        other.to("cpu")
                        alone.callback(other.to, inputs.device)
                    torch.cuda.empty_cache()
                for mode in MODES:
                    kwargs = dict(timeout_s=s.trial_timeout_s, new_tokens=s.maxlen_new_tokens, prefill_chunk=s.prefill_chunk)
                    if cuda:
                        runner = CudaTrial(model, mode, **kwargs)
                    else:
                        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
                        runner = ProcessTrial(folders[role], mode, budget_bytes=budget, dtype=dtype, threads=s.threads, **kwargs)
                    results.setdefault(mode, {})[role] = _search(runner, mode, s, budget, progress, f"max length ({mode}) · {role}")
    return results


def _search(runner, mode: str, s: BenchSettings, budget: int | None, progress: Progress, task: str) -> MaxLenResult:
    """:func:`max_length` with ``runner``, every trial reported to ``progress`` (the total is unknown)."""
    count = 0
    progress.start(task)

    def trial(n: int) -> Trial:
        nonlocal count
        progress.update(task, count, detail=f"trying {n:,} tokens")
        r = runner(n)
        count += 1
        progress.update(task, count, detail=f"{n:,} tokens: {r.outcome}")
        return r

    found = max_length(
        trial,
        mode,
        start=min(s.max_len_start, s.max_len_cap),
        cap=s.max_len_cap,
        granularity=s.granularity,
        timeout_s=s.trial_timeout_s,
        budget_bytes=budget,
        new_tokens=s.maxlen_new_tokens,
    )
    found.loaded_bytes = runner.loaded_bytes
    progress.update(task, count, detail=f"{found.max_length:,} tokens ({found.bound})")
    progress.end(task)
    return found


def maxlen_json(results: dict[str, dict[str, MaxLenResult]], s: BenchSettings) -> dict:
    """The search settings once, then per mode each role's figures and trials and the ratio linearized ÷ original."""
    any_ = next(iter(next(iter(results.values())).values()))
    out = {
        "budget_bytes": any_.budget_bytes,
        "cap": any_.cap,
        "trial_timeout_s": any_.timeout_s,
        "granularity": any_.granularity,
        "start": s.max_len_start,
        "new_tokens": s.maxlen_new_tokens,
        **dict.fromkeys(MODES),
    }
    figures = lambda r: {
        "max_length": r.max_length,
        "bound": r.bound,
        "first_failure": r.first_failure,
        "loaded_bytes": r.loaded_bytes,
        "seconds": r.seconds,
        "trials": [asdict(t) for t in r.trials],
    }
    for mode, pair in results.items():
        out[mode] = per_role(pair, figures)
        out[mode]["ratio"] = ratio(*(out[mode][r] and out[mode][r]["max_length"] for r in ("linearized", "original")))
    return out
