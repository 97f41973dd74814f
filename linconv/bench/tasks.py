"""The bench tasks, by name: what ``linconv bench --tasks`` accepts, in what order they run, and where
each one's part of the JSON report comes from.

A task lives in its own module: a function ``run(inputs, settings, progress)`` that measures every
model in ``inputs.models`` and returns its result (dataclasses), and a function that turns that
result into the task's part of the JSON report, beside the dataclass it reads. Adding a task is that
module plus one entry here; the CLI's ``--tasks`` help, the validation of task names, the run order
and the JSON report all come from this registry (a table for the terminal, if wanted, is a function
in :mod:`linconv.report` reading ``result.results[name]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from linconv.bench.base import BenchInputs
from linconv.bench.downstream import downstream_json, run_downstream
from linconv.bench.leakage import leakage_json, run_leakage
from linconv.bench.longppl import check_longppl, long_perplexity_json, run_longppl
from linconv.bench.maxlen import check_budget, maxlen_json, run_maxlen
from linconv.bench.passkey import passkey_json, run_passkey
from linconv.bench.perplexity import perplexity_json, run_perplexity
from linconv.bench.speculative import check_spec, run_spec, spec_json
from linconv.bench.speed import run_speed, speed_json
from linconv.errors import LinconvError
from linconv.progress import Progress

if TYPE_CHECKING:  # run.py imports this registry
    from linconv.bench.run import BenchSettings


@dataclass(frozen=True)
class Task:
    """One registered task: how it runs, where its figures go in the JSON report, how it is offered."""

    run: Callable[[BenchInputs, BenchSettings, Progress], Any]  # measures; returns the task's result
    json: Callable[[Any, BenchSettings], Any]  # that result -> the task's part of the JSON report
    key: str  # where that part sits in the report (``null`` when the task did not run)
    order: int  # tasks run in increasing order: cheap ones first, so their figures are in before a long search
    description: str  # for ``--tasks`` help
    default: bool = True  # runs when ``--tasks`` is not given
    needs_text: bool = False  # reads the tokenized text (``inputs.tokens``; implies needs_tokenizer)
    needs_tokenizer: bool = False  # encodes or decodes text (``inputs.tokenizer``)
    check: Callable[[BenchInputs, BenchSettings], None] | None = None  # before the first task: LinconvError if it cannot work


# The order of the entries is the order of the keys in the JSON report.
TASKS: dict[str, Task] = {
    "ppl": Task(run_perplexity, perplexity_json, "perplexity", 20, "perplexity on the text", needs_text=True),
    "maxlen": Task(run_maxlen, maxlen_json, "max_length", 50, "longest sequence within the memory budget", check=check_budget),
    "speed": Task(run_speed, speed_json, "speed", 30, "prefill and decode tokens/s by context length"),
    "leakage": Task(run_leakage, leakage_json, "leakage", 10, "do outputs depend on future tokens"),
    "spec": Task(run_spec, spec_json, "spec", 40, "speculative vs plain decoding", default=False, needs_text=True, check=check_spec),
    "downstream": Task(run_downstream, downstream_json, "downstream", 42, "zero-shot task accuracy", default=False, needs_tokenizer=True),
    "longppl": Task(
        run_longppl,
        long_perplexity_json,
        "long_perplexity",
        44,
        "perplexity by position",
        default=False,
        needs_text=True,
        check=check_longppl,
    ),
    "passkey": Task(run_passkey, passkey_json, "passkey", 46, "recall of a hidden key", default=False, needs_tokenizer=True),
}
DEFAULT_TASKS = tuple(name for name, task in TASKS.items() if task.default)


def check_names(names: Iterable[str]) -> None:
    """LinconvError unless ``names`` is a non-empty list of registered tasks."""
    names = list(names)
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise LinconvError(f"unknown task {', '.join(unknown) or '(none)'}; choose from: {', '.join(TASKS)}")


def run_order(names: Iterable[str]) -> list[str]:
    """``names`` in the order they run."""
    return sorted(set(names), key=lambda name: TASKS[name].order)
