"""``linconv bench`` as a library call: load the linearized model and its baseline, run the chosen
tasks for both, and return every figure in one :class:`BenchResult`.

The tasks are registered in :mod:`linconv.bench.tasks` and run in its order, cheapest first: leakage,
perplexity (``ppl``), speed, speculative decoding (``spec``), the evaluations of the field
(``downstream``, ``longppl``, ``passkey``), max length (``maxlen``); what they do
is reported to a :class:`linconv.progress.Progress`, and what each returns is kept in
``result.results[name]``. ``on_update(result)`` is called after every task, so a caller that saves
the result there keeps everything measured so far when a later task fails or the run is
interrupted. A task that fails stops the run and leaves no result: its error is recorded in
``result.errors`` and the function returns (a :class:`LinconvError`) or re-raises (any other
exception, after ``on_update``). Problems that can be seen before measuring anything (bad options,
a text shorter than one window, a memory budget below the weights, different tokenizers) raise
:class:`LinconvError` before the first task.

The baseline defaults to the model the checkpoint was converted from (``config.linconv["source"]``);
without a checkpoint the default model is loaded once, converted in memory, and is its own baseline.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from linconv.bench.base import ROLES, BenchInputs, position_limit_of, weights_bytes
from linconv.bench.downstream import DEFAULT_EVAL_TASKS, parse_eval_tasks
from linconv.bench.passkey import parse_depths, parse_lengths
from linconv.bench.speed import parse_contexts
from linconv.bench.tasks import DEFAULT_TASKS, TASKS, check_names, run_order
from linconv.config import parse_dtype
from linconv.convert import load_or_convert
from linconv.data import SPLITS, load_text, same_tokenizer, tokenize, windows
from linconv.errors import LinconvError, first_line
from linconv.models import ADAPTERS
from linconv.progress import SILENT, Progress
from linconv.sources import DEFAULT_SOURCE, load_source
from linconv.version import __version__

SCHEMA_VERSION = 1

# CPU defaults: `linconv bench` of the default model (135M, fp32) in about 12 minutes on 2 quiet cores.
# A max-length trial process holds ~1.0 GB with the model loaded; prefill in chunks of 512 keeps the
# linearized model's peak flat at ~1.15 GB at any length, while the original's KV cache and attention
# add ~55-70 KB per token: under the 1.25 GiB budget it stops at ~5K tokens within a minute or two,
# and the linearized model should reach the 32K cap (>= 6x). Contexts stay <= 4K so that the
# original's quadratic prefill does not dominate the run.
CPU_DEFAULTS = dict(
    memory_budget_gib=1.25,
    max_len_cap=32768,
    max_len_start=2048,
    granularity=1024,
    trial_timeout_s=180.0,
    contexts=(256, 1024, 4096),
    repeats=2,
    decode_tokens=16,
    prefill_chunk=512,
    ppl_tokens=16384,
    passkey_lengths=(1024, 2048, 4096),  # the original's 4K prefill takes ~10 s; 5 depths x 2 trials
    passkey_trials=2,
)
# CUDA: the whole device unless --memory-budget; a CUDA trial cannot be interrupted, so the time limit
# is checked when it ends and the cap bounds the longest trial.
CUDA_DEFAULTS = dict(
    memory_budget_gib=None,
    max_len_cap=524288,
    max_len_start=2048,
    granularity=4096,
    trial_timeout_s=120.0,
    contexts=(256, 2048, 8192, 16384),
    repeats=3,
    decode_tokens=64,
    prefill_chunk=2048,
    ppl_tokens=131072,
    passkey_lengths=(1024, 2048, 4096, 8192, 16384),
    passkey_trials=5,
)


@dataclass
class BenchSettings:
    """Every option of a run; ``None`` fields take the device's default (:func:`resolve`)."""

    checkpoint: str | None = None  # a linconv folder; None: convert the default model now
    baseline: str | None = "auto"  # "auto": the checkpoint's source; "none": no baseline; or a path / hub id
    text: str | None = None  # file, folder, datasets name, or a built-in split ("heldout", "britannica")
    tasks: tuple[str, ...] = DEFAULT_TASKS
    device: str = "cpu"  # a torch device ("cpu", "cuda", "cuda:1"); the CLI resolves "auto"
    dtype: str | None = None  # fp32, bf16, fp16; None: fp32 for a fresh conversion, else the checkpoint's own
    memory_budget_gib: float | None = None  # CPU: RSS budget of one max-length trial; CUDA: cap on device memory
    max_len_cap: int | None = None
    max_len_start: int | None = None
    granularity: int | None = None
    trial_timeout_s: float | None = None
    maxlen_new_tokens: int = 8
    contexts: tuple[int, ...] | None = None
    decode_tokens: int | None = None
    repeats: int | None = None
    prefill_chunk: int | None = None  # prompt tokens per forward in speed and max-length prefill
    ppl_window: int = 1024
    spec_tokens: int = 64  # tokens generated per speculative-decoding measurement
    spec_drafts: tuple[str, ...] = ("auto",)  # drafts compared (auto: lookup + the checkpoint's Medusa/EAGLE heads)
    ppl_tokens: int | None = None  # 0: the whole text
    threads: int | None = None
    compile: bool = False  # speed: decode steps through torch.compile (linconv.compiled), both models alike
    eval_tasks: tuple[str, ...] = DEFAULT_EVAL_TASKS  # downstream: lm-evaluation-harness tasks and next_line
    eval_limit: int | None = None  # downstream: items per task
    eval_include: str | None = None  # downstream: a folder of the user's own lm-evaluation-harness tasks
    long_tokens: int = 32768  # longppl: tokens of the text read
    passkey_lengths: tuple[int, ...] | None = None
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_trials: int | None = None

    def resolve(self) -> BenchSettings:
        """Fill device defaults and check every option (LinconvError on the first bad one)."""
        defaults = CUDA_DEFAULTS if torch.device(self.device).type == "cuda" else CPU_DEFAULTS
        values = asdict(self)
        for key, value in defaults.items():
            if key == "memory_budget_gib":
                continue
            if values[key] is None:
                values[key] = value
        if values["memory_budget_gib"] is None:
            values["memory_budget_gib"] = defaults["memory_budget_gib"]
        values["contexts"] = tuple(parse_contexts(values["contexts"]))
        values["eval_tasks"] = parse_eval_tasks(values["eval_tasks"])
        values["passkey_lengths"] = parse_lengths(values["passkey_lengths"])
        values["passkey_depths"] = parse_depths(values["passkey_depths"])
        parse_dtype(values["dtype"])
        if values["threads"] is not None and values["threads"] <= 0:
            raise LinconvError(f"--threads must be > 0, got {values['threads']}")
        values["threads"] = values["threads"] or torch.get_num_threads()
        out = BenchSettings(**values)
        check_names(out.tasks)
        positive = {
            "--max-len-cap": out.max_len_cap,
            "--trial-timeout": out.trial_timeout_s,
            "--ppl-window": out.ppl_window,
            "granularity": out.granularity,
            "--repeats": out.repeats,
            "--prefill-chunk": out.prefill_chunk,
            "max-length start": out.max_len_start,
        }
        for name, value in positive.items():
            if value is None or not 0 < value < math.inf:  # also refuses nan
                raise LinconvError(f"{name} must be > 0 and finite, got {value}")
        if out.memory_budget_gib is not None and not 0 < out.memory_budget_gib < math.inf:
            raise LinconvError(f"--memory-budget must be > 0 GiB and finite, got {out.memory_budget_gib}")
        if out.ppl_window < 2:
            raise LinconvError(f"--ppl-window must be at least 2 tokens, got {out.ppl_window}")
        if out.ppl_tokens is not None and out.ppl_tokens < 0:
            raise LinconvError(f"--ppl-tokens must be >= 0 (0: the whole text), got {out.ppl_tokens}")
        if out.spec_tokens <= 0:
            raise LinconvError(f"--spec-tokens must be > 0, got {out.spec_tokens}")
        if out.decode_tokens < 2:
            raise LinconvError(f"--decode-tokens must be at least 2, got {out.decode_tokens}")
        if out.eval_limit is not None and out.eval_limit <= 0:
            raise LinconvError(f"--eval-limit must be > 0, got {out.eval_limit}")
        if out.eval_include is not None and not Path(out.eval_include).is_dir():
            raise LinconvError(f"--eval-include {out.eval_include} is not a folder")
        if out.long_tokens < 2:
            raise LinconvError(f"--long-tokens must be at least 2, got {out.long_tokens}")
        if out.passkey_trials <= 0:
            raise LinconvError(f"--passkey-trials must be > 0, got {out.passkey_trials}")
        return out


@dataclass
class BenchResult:
    settings: BenchSettings
    environment: dict
    models: dict[str, dict] = field(default_factory=dict)  # role -> name, class, parameters, weights_bytes, dtype
    text: dict | None = None  # source, characters, tokens
    results: dict[str, Any] = field(default_factory=dict)  # task name -> what its run returned (see linconv.bench.tasks)
    completed: list[str] = field(default_factory=list)  # tasks finished
    errors: list[dict] = field(default_factory=list)  # {"task", "message"}
    notes: list[str] = field(default_factory=list)  # settings changed to fit the models (position limits)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def status(self) -> str:
        return "failed" if self.errors else "complete" if set(self.completed) >= set(self.settings.tasks) else "partial"


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "linconv": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "cpu_count": os.cpu_count(),
    }


def model_info(model: nn.Module, name: str) -> dict:
    return {
        "name": name,
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": weights_bytes(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "linconv": getattr(model.config, "linconv", None),
    }


def _load_models(s: BenchSettings, device: torch.device, dtype: torch.dtype | None):
    """(linearized, its tokenizer, its name, original or None, its tokenizer, its name)."""
    model, tok, base = load_or_convert(s.checkpoint, dtype=dtype, device=device)
    name = s.checkpoint
    if s.checkpoint is None:
        name = f"fresh conversion of {DEFAULT_SOURCE} ({model.config.linconv['attention']})"
        if s.baseline in ("auto", None):
            return model, tok, name, base, tok, DEFAULT_SOURCE
        del base
    if s.baseline == "none":
        return model, tok, name, None, None, None
    source = s.baseline
    if source in ("auto", None):
        source = (getattr(model.config, "linconv", None) or {}).get("source")
        if not source:
            raise LinconvError(f"{name} does not record the model it was converted from; pass --baseline PATH or --baseline none")
    dtype = dtype or next(model.parameters()).dtype
    try:
        base, base_tok = load_source(source, ADAPTERS, dtype=dtype, device=device)
    except LinconvError as e:
        raise LinconvError(f"baseline {source}: {e} (pass --baseline PATH, or --baseline none to skip it)") from None
    return model, tok, name, base, base_tok, source


def fit_positions(s: BenchSettings, limit: int | None) -> tuple[BenchSettings, str | None]:
    """``s`` cut to models that take at most ``limit`` tokens (learned position embeddings, GPT-2):
    lengths past it cannot be run at all. Returns the settings and a note saying what changed."""
    if limit is None:
        return s, None
    fits = tuple(c for c in s.contexts if c + s.decode_tokens <= limit) or (max(1, limit - s.decode_tokens),)
    changes = {
        "contexts": fits,
        "ppl_window": min(s.ppl_window, limit),
        "max_len_cap": min(s.max_len_cap, limit - s.maxlen_new_tokens),
        "spec_tokens": min(s.spec_tokens, limit // 4),
    }
    changed = {k: v for k, v in changes.items() if v != getattr(s, k)}
    if not changed:
        return s, None
    show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    listed = "; ".join(f"{k.replace('_', ' ')} {show(getattr(s, k))} -> {show(v)}" for k, v in changed.items())
    return replace(s, **changed), f"the models take at most {limit} tokens (learned positions): {listed}"


def run_bench(
    settings: BenchSettings, *, on_update: Callable[[BenchResult], None] | None = None, progress: Progress = SILENT
) -> BenchResult:
    """Run the benchmark (see the module docstring); setup steps are reported as the task ``setup``."""
    s = settings.resolve()
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        result, inputs = _prepare(s, progress)
        _run_tasks(result, inputs, result.settings, progress, on_update)
        return result
    finally:
        torch.set_num_threads(threads)


def _prepare(s: BenchSettings, progress: Progress) -> tuple[BenchResult, BenchInputs]:
    """Load the models and read the text; every check that needs them and no measuring, so a run that
    cannot work fails here, before the first task."""
    device, dtype = torch.device(s.device), parse_dtype(s.dtype)
    progress.start("setup")
    progress.update("setup", 0, detail="loading the models…")
    model, tok, name, base, base_tok, base_name = _load_models(s, device, dtype)
    models, names = {"original": base, "linearized": model}, {"original": base_name, "linearized": name}
    s, note = fit_positions(s, position_limit_of(m for m in models.values() if m is not None))
    inputs = BenchInputs(
        {role: models[role] for role in ROLES if models[role] is not None}, {"original": base_name, "linearized": s.checkpoint}, device
    )
    result = BenchResult(s, environment(device, next(model.parameters()).dtype, s.threads), notes=[note] if note else [])
    result.models = {role: model_info(m, names[role]) for role, m in inputs.models.items()}
    if base is not None and not same_tokenizer(tok, base_tok):
        raise LinconvError(
            f"the checkpoint and the baseline {base_name} use different tokenizers; their perplexities "
            "are not comparable (pass --baseline with the original model, or --baseline none)"
        )
    if tok is None and any(TASKS[task].needs_text or TASKS[task].needs_tokenizer for task in s.tasks):
        textual = "/".join(task for task in s.tasks if TASKS[task].needs_text or TASKS[task].needs_tokenizer)
        raise LinconvError(
            f"{name} has no tokenizer files, needed for perplexity and prompts; save them into the folder or drop {textual} from --tasks"
        )
    inputs.tokenizer = tok
    if any(TASKS[task].needs_text for task in s.tasks):
        progress.update("setup", 0, detail="reading the text…")
        spec, split = (None, s.text) if s.text in SPLITS else (s.text, "heldout")
        text = load_text(spec, split)
        inputs.tokens = tokenize(tok, text)
        usable = windows(inputs.tokens, s.ppl_window, s.ppl_tokens or None)  # raises when shorter than one window
        result.text = {"source": s.text or "heldout", "characters": len(text), "tokens": len(inputs.tokens), "tokens_used": usable.numel()}
    for task in run_order(s.tasks):
        if TASKS[task].check is not None:
            TASKS[task].check(inputs, s)
    progress.update("setup", 1, 1, detail="done")
    progress.end("setup")
    return result, inputs


def _run_tasks(result: BenchResult, inputs: BenchInputs, s: BenchSettings, progress: Progress, on_update) -> None:
    """Run the chosen tasks in order into ``result``; the first failure stops the run (see the module docstring)."""
    for name in run_order(s.tasks):
        try:
            result.results[name] = TASKS[name].run(inputs, s, progress)
        except LinconvError as e:
            result.errors.append({"task": name, "message": str(e)})
            break
        except Exception as e:
            result.errors.append({"task": name, "message": first_line(e, with_type=True)})
            if on_update is not None:
                on_update(result)
            raise
        result.completed.append(name)
        if on_update is not None:
            on_update(result)
    if result.errors and on_update is not None:
        on_update(result)
