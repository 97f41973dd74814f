"""``downstream``: zero-shot accuracy on the field's standard tasks, through lm-evaluation-harness.

Linearization papers report PIQA, ARC-e/c, HellaSwag and WinoGrande accuracy through
lm-evaluation-harness (LoLCATs, Liger, Lizard, MOHAWK); this runs the same harness on the in-memory
models (its ``HFLM`` wrapper around the model object and its tokenizer), so the figures are
comparable with theirs. The harness is an optional extra (``pip install 'linconv[eval]'``) and is
imported only here.

The standard tasks download their datasets from the Hugging Face Hub. Offline, a task whose dataset
is not in the datasets cache is skipped with a one-line reason (the Hub is probed once, so an offline
machine does not wait through the download retries). The built-in ``next_line`` task
(:mod:`linconv.bench.nextline`) needs no download: through the harness when it is installed (as a
generated task folder), else scored by linconv itself with the harness's rule.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from torch import nn

from linconv.bench.base import ROLES, BenchInputs
from linconv.bench.nextline import TASK_NAME, next_line_items, score_items, write_lm_eval_task
from linconv.data import builtin_text
from linconv.errors import LinconvError, first_line
from linconv.progress import SILENT, Progress

if TYPE_CHECKING:  # run.py imports this module through the task registry
    from linconv.bench.run import BenchSettings

DEFAULT_EVAL_TASKS = (TASK_NAME, "piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
NEXT_LINE_ITEMS = 400  # items of the built-in task unless --eval-limit is smaller
BATCH_SIZE = 8  # requests per forward: the harness right-pads, which a causal model ignores
INSTALL = "pip install 'linconv[eval]'"


@dataclass
class DownstreamSettings:
    tasks: tuple[str, ...] = DEFAULT_EVAL_TASKS  # lm-evaluation-harness task (or group) names, and next_line
    limit: int | None = None  # at most this many items per task (None: all)
    include: str | None = None  # a folder of the user's own lm-evaluation-harness task YAMLs


@dataclass
class TaskAccuracy:
    """One task's accuracy for each model (role -> fraction correct)."""

    task: str
    items: int  # items evaluated (after --eval-limit)
    runner: str  # "lm-eval" or "linconv" (next_line scored without the harness)
    acc: dict[str, float] = field(default_factory=dict)
    acc_norm: dict[str, float] = field(default_factory=dict)  # per-character normalised; absent for tasks without it

    @property
    def ratio(self) -> float | None:
        """linearized ÷ original accuracy."""
        a, b = self.acc.get("linearized"), self.acc.get("original")
        return a / b if a is not None and b else None


@dataclass
class DownstreamResult:
    tasks: list[TaskAccuracy] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # task -> why it was skipped (one line)
    limit: int | None = None
    seconds: float = 0.0


def downstream_json(result: DownstreamResult, s: BenchSettings | None = None) -> dict:
    """The bench JSON's ``downstream`` part (:data:`SCHEMA`); the result holds every setting it needs."""
    return {
        "limit": result.limit,
        "seconds": result.seconds,
        "tasks": {
            t.task: {
                "items": t.items,
                "runner": t.runner,
                **{role: _scores(t, role) for role in ROLES},
                "ratio": t.ratio,
            }
            for t in result.tasks
        },
        "unavailable": dict(result.unavailable),
    }


def _scores(t: TaskAccuracy, role: str) -> dict | None:
    return {"acc": t.acc[role], "acc_norm": t.acc_norm.get(role)} if role in t.acc else None


_NUMBER = {"type": ["number", "null"]}
_ROLE_SCORES = {"type": ["object", "null"], "required": ["acc", "acc_norm"], "properties": {"acc": {"type": "number"}, "acc_norm": _NUMBER}}
# The JSON of downstream_json (JSON Schema); the bench JSON's "downstream" key.
SCHEMA = {
    "type": "object",
    "required": ["limit", "seconds", "tasks", "unavailable"],
    "properties": {
        "limit": {"type": ["integer", "null"]},
        "seconds": {"type": "number"},
        "tasks": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["items", "runner", "original", "linearized", "ratio"],
                "properties": {
                    "items": {"type": "integer"},
                    "runner": {"type": "string", "enum": ["lm-eval", "linconv"]},
                    "original": _ROLE_SCORES,
                    "linearized": _ROLE_SCORES,
                    "ratio": _NUMBER,
                },
            },
        },
        "unavailable": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def parse_eval_tasks(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """``"next_line,piqa"`` -> ("next_line", "piqa"), in order, without repeats."""
    names = text.split(",") if isinstance(text, str) else text
    out = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not out:
        raise LinconvError("--eval-tasks names no task")
    return out


def downstream(models: dict[str, tuple[nn.Module, object]], settings: DownstreamSettings, progress: Progress = SILENT) -> DownstreamResult:
    """Accuracy of every model in ``models`` (role -> (model, tokenizer)) on ``settings.tasks``."""
    if settings.limit is not None and settings.limit <= 0:
        raise LinconvError(f"--eval-limit must be > 0, got {settings.limit}")
    t0 = time.perf_counter()
    items = []
    if TASK_NAME in settings.tasks:
        items = next_line_items(builtin_text("heldout"), min(settings.limit or NEXT_LINE_ITEMS, NEXT_LINE_ITEMS))
    try:
        import lm_eval  # noqa: F401  (optional and heavy: pulls in datasets, pandas, scikit-learn)
    except ImportError:
        harness = [t for t in settings.tasks if t != TASK_NAME]
        if harness or settings.include:
            raise LinconvError(
                f"downstream tasks {', '.join(harness) or 'from --eval-include'} need lm-evaluation-harness: {INSTALL} "
                f"(--eval-tasks {TASK_NAME} runs the built-in task without it)"
            ) from None
        result = DownstreamResult(limit=settings.limit)
        result.tasks.append(_score_locally(models, items, progress))
    else:
        with tempfile.TemporaryDirectory(prefix="linconv-eval-") as tmp:
            result = _run_harness(models, settings, write_lm_eval_task(items, tmp) if items else None, progress)
    result.seconds = time.perf_counter() - t0
    return result


def _score_locally(models, items, progress: Progress) -> TaskAccuracy:
    task = TaskAccuracy(TASK_NAME, len(items), "linconv")
    for role in ROLES:
        if role in models:
            label = f"downstream · {role}"
            progress.start(label, len(items))
            score = score_items(*models[role], items, lambda done, total, label=label: progress.update(label, done, total))
            progress.end(label)
            task.acc[role], task.acc_norm[role] = score.acc, score.acc_norm
    return task


def _run_harness(models, settings: DownstreamSettings, local_folder, progress: Progress) -> DownstreamResult:
    """Every available task through lm-evaluation-harness, one ``simple_evaluate`` per model."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    result = DownstreamResult(limit=settings.limit)
    paths = [str(p) for p in (local_folder, settings.include) if p]
    progress.start("downstream · loading tasks", None)
    with _quiet(), _hub_offline_if_unreachable() as offline:
        manager = TaskManager(include_path=paths or None, include_defaults=False)
        if not set(settings.tasks) <= set(manager.all_tasks):  # indexing the harness's 14K task files takes ~20 s
            manager = TaskManager(include_path=paths or None)
        unknown = [t for t in settings.tasks if t not in manager.all_tasks]
        if unknown:
            raise LinconvError(f"unknown lm-evaluation-harness task {', '.join(unknown)} (see `lm-eval ls tasks`, or --eval-include PATH)")
        ready = []
        for name in settings.tasks:
            try:
                manager.load([name])  # loads (or downloads) the dataset
                ready.append(name)
            except Exception as e:  # the harness and datasets raise many kinds; the reason is reported, not lost
                why = first_line(e)
                if offline:
                    why = f"its dataset is not in the datasets cache and the Hugging Face Hub is unreachable ({why})"
                result.unavailable[name] = why
        progress.end("downstream · loading tasks")
        scores: dict[str, TaskAccuracy] = {}
        for role in ROLES:
            if role not in models or not ready:
                continue
            label = f"downstream · {role}"
            progress.start(label, None)
            lm = _progress_lm(*models[role], lambda done, total, label=label: progress.update(label, done, total))
            out = simple_evaluate(model=lm, tasks=ready, task_manager=manager, limit=settings.limit, bootstrap_iters=0, log_samples=False)
            progress.end(label)
            for task, metrics in out["results"].items():
                if "acc,none" not in metrics:
                    continue  # a group without an aggregate, or a task without accuracy
                n = out.get("n-samples", {}).get(task, {}).get("effective", 0)
                entry = scores.setdefault(task, TaskAccuracy(task, n, "lm-eval"))
                entry.acc[role] = metrics["acc,none"]
                if "acc_norm,none" in metrics:
                    entry.acc_norm[role] = metrics["acc_norm,none"]
        result.tasks = list(scores.values())
    return result


def _progress_lm(model: nn.Module, tokenizer, tick):
    """The harness's HF wrapper around ``model``, reporting how many requests are done."""
    from lm_eval.models.huggingface import HFLM

    class ProgressLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._done, self._total = 0, len(requests)
            tick(0, self._total)
            return super().loglikelihood(requests, disable_tqdm=True)

        def _model_call(self, inps, *args, **kwargs):
            out = super()._model_call(inps, *args, **kwargs)
            self._done = min(self._done + inps.shape[0], self._total)
            tick(self._done, self._total)
            return out

    return ProgressLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the harness's and datasets' warnings and progress bars (linconv reports progress)."""
    import datasets
    import lm_eval.api.task

    names = ("lm_eval", "datasets", "huggingface_hub", "absl")
    levels = {n: logging.getLogger(n).level for n in names}
    bars = not datasets.utils.are_progress_bars_disabled()
    tqdm = lm_eval.api.task.tqdm
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        lm_eval.api.task.tqdm = lambda it, **kw: it  # its request-building bar cannot be turned off otherwise
        yield
    finally:
        lm_eval.api.task.tqdm = tqdm
        if bars:
            datasets.enable_progress_bars()
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


@contextlib.contextmanager
def _hub_offline_if_unreachable(timeout_s: float = 3.0) -> Iterator[bool]:
    """Yields whether the Hub cannot be used. When it cannot be reached, datasets and huggingface_hub
    run in offline mode meanwhile (cached datasets load; the rest fail at once instead of after ~24 s of
    retries per task)."""
    import datasets.config
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        yield True
        return
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield False
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


# --- the ``downstream`` bench task ----------------------------------------------------------------


def run_downstream(inputs: BenchInputs, s: BenchSettings, progress: Progress) -> DownstreamResult:
    """Every model on the same tasks and items."""
    return downstream(inputs.with_tokenizer(), DownstreamSettings(s.eval_tasks, s.eval_limit, s.eval_include), progress)
