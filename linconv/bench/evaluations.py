"""The evaluations of the field inside ``linconv bench``: ``downstream``, ``longppl`` and ``passkey``.

Each is a self-contained task module (models, its settings, a :class:`linconv.progress.Progress`
-> a result dataclass with its JSON schema beside it); this maps the bench's settings onto them and
the bench's progress callable onto the Progress protocol.
"""

from __future__ import annotations

from collections.abc import Callable

from linconv.bench.downstream import DownstreamSettings, downstream
from linconv.bench.longppl import LongPplSettings, long_perplexity
from linconv.bench.passkey import PasskeySettings, passkey
from linconv.progress import Progress

Callback = Callable[[str, float, float | None, str], None]  # (label, completed, total or None, detail)


class CallbackProgress(Progress):
    """The Progress protocol over a ``callback(label, done, total, detail)``."""

    def __init__(self, callback: Callback):
        self.callback, self.totals, self.done = callback, {}, {}

    def start(self, task: str, total: float | None = None, completed: float = 0) -> None:
        self.totals[task], self.done[task] = total, completed
        self.callback(task, completed, total, "")

    def update(self, task: str, completed: float, total: float | None = None, **fields) -> None:
        self.totals[task] = total if total is not None else self.totals.get(task)
        self.done[task] = completed
        self.callback(task, completed, self.totals[task], " ".join(f"{k} {v}" for k, v in fields.items()))

    def end(self, task: str) -> None:
        done = self.done.get(task, 0)
        self.callback(task, done, self.totals.get(task) or done, "done")  # a total stops the bar's clock


def run_evaluation(task: str, result, models, tokenizer, s, callback: Callback, tokens=None) -> None:
    """Run ``task`` for ``models`` [(role, model)] sharing ``tokenizer``, with the bench settings ``s``;
    store its result on the bench ``result``. ``tokens``: the bench text's ids (longppl's document)."""
    pairs, progress = {role: (m, tokenizer) for role, m in models}, CallbackProgress(callback)
    if task == "downstream":
        result.downstream = downstream(pairs, DownstreamSettings(s.eval_tasks, s.eval_limit, s.eval_include), progress)
    elif task == "longppl":
        result.long_perplexity = long_perplexity(pairs, tokens, LongPplSettings(s.long_tokens, s.prefill_chunk), progress)
    elif task == "passkey":
        settings = PasskeySettings(s.passkey_lengths, s.passkey_depths, s.passkey_trials, s.prefill_chunk)
        result.passkey = passkey(pairs, settings, progress)
    else:
        raise ValueError(f"not an evaluation task: {task!r}")
