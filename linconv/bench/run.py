"""``linconv bench`` as a library call: load the linearized model and its baseline, run the chosen
tasks for both, and return every figure in one :class:`BenchResult`.

Tasks run in a fixed order, cheapest first: leakage, perplexity (``ppl``), speed, the evaluations
(``downstream``, ``longppl``, ``passkey``), max length
(``maxlen``). ``on_update(result)`` is called after every task, so a caller that saves the result
there keeps everything measured so far when a later task fails or the run is interrupted. A task
that fails stops the run: its error is recorded in ``result.errors`` and the function returns
(a :class:`LinconvError`) or re-raises (any other exception, after ``on_update``). Problems that can
be seen before measuring anything (bad options, a text shorter than one window, a memory budget
below the weights, different tokenizers) raise :class:`LinconvError` before the first task.

The baseline defaults to the model the checkpoint was converted from (``config.linconv["source"]``);
without a checkpoint the default model is loaded once, converted in memory, and is its own baseline.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from linconv.bench import ROLES
from linconv.bench.downstream import DEFAULT_EVAL_TASKS, DownstreamResult, parse_eval_tasks
from linconv.bench.evaluations import run_evaluation
from linconv.bench.leakage import LeakageResult, leakage_check
from linconv.bench.longppl import LongPplResult
from linconv.bench.maxlen import GIB, MODES, CudaTrial, MaxLenResult, ProcessTrial, cuda_budget, max_length
from linconv.bench.passkey import PasskeyResult, parse_depths, parse_lengths
from linconv.bench.perplexity import PerplexityResult, perplexity
from linconv.bench.speculative import SpecPoint, spec_decode_point, spec_prompts
from linconv.bench.speed import SpeedResult, parse_contexts, speed
from linconv.config import parse_dtype
from linconv.data import same_tokenizer
from linconv.errors import LinconvError
from linconv.speculative.drafts import PromptLookup

SCHEMA_VERSION = 1
TASKS = ("ppl", "maxlen", "speed", "leakage", "spec", "downstream", "longppl", "passkey")
DEFAULT_TASKS = ("ppl", "maxlen", "speed", "leakage")  # spec: `linconv bench --spec-decode`
# run order: cheapest first, the long search last
ORDER = ("leakage", "ppl", "speed", "spec", "downstream", "longppl", "passkey", "maxlen")
DEFAULT_SOURCE = "default:SmolLM2-135M-Instruct"

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

Progress = Callable[[str, float, float | None, str], None]  # (label, completed, total or None, detail)


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
    ppl_tokens: int | None = None  # 0: the whole text
    threads: int | None = None
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
        values["threads"] = values["threads"] or torch.get_num_threads()
        out = BenchSettings(**values)
        unknown = [t for t in out.tasks if t not in TASKS]
        if unknown or not out.tasks:
            raise LinconvError(f"unknown task {', '.join(unknown) or '(none)'}; choose from: {', '.join(TASKS)}")
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
            if value is None or value <= 0:
                raise LinconvError(f"{name} must be > 0, got {value}")
        if out.memory_budget_gib is not None and out.memory_budget_gib <= 0:
            raise LinconvError(f"--memory-budget must be > 0 GiB, got {out.memory_budget_gib}")
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
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)  # role -> result
    max_length: dict[str, dict[str, MaxLenResult]] = field(default_factory=dict)  # mode -> role -> result
    speed: dict[str, SpeedResult] = field(default_factory=dict)  # role -> result
    leakage: LeakageResult | None = None  # the linearized model only
    spec: list[SpecPoint] = field(default_factory=list)  # model x prompt kind
    downstream: DownstreamResult | None = None
    long_perplexity: LongPplResult | None = None
    passkey: PasskeyResult | None = None
    completed: list[str] = field(default_factory=list)  # tasks finished
    errors: list[dict] = field(default_factory=list)  # {"task", "message"}
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def status(self) -> str:
        return "failed" if self.errors else "complete" if set(self.completed) >= set(self.settings.tasks) else "partial"


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict:
    import transformers

    import linconv

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "linconv": linconv.__version__,
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


def weights_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
    import linconv
    from linconv.models import ADAPTERS
    from linconv.sources import load_source

    if s.checkpoint is None:
        base, tok = load_source(None, ADAPTERS, dtype=dtype or torch.float32, device=device)
        config = linconv.LinearizeConfig(source=DEFAULT_SOURCE)
        model = linconv.convert(base, config)
        name = f"fresh conversion of {DEFAULT_SOURCE} ({config.attention})"
        if s.baseline in ("auto", None):
            return model, tok, name, base, tok, DEFAULT_SOURCE
        del base
    else:
        model, tok = linconv.load(s.checkpoint, dtype=dtype, device=device)
        name = s.checkpoint
    if s.baseline == "none":
        return model, tok, name, None, None, None
    source = s.baseline
    if source in ("auto", None):
        source = (getattr(model.config, "linconv", None) or {}).get("source")
        if not source:
            raise LinconvError(f"{name} does not record the model it was converted from; pass --baseline PATH or --baseline none")
    dtype = dtype or next(model.parameters()).dtype
    where = None if source == DEFAULT_SOURCE or source.startswith("default:") else source
    try:
        base, base_tok = load_source(where, ADAPTERS, dtype=dtype, device=device)
    except LinconvError as e:
        raise LinconvError(f"baseline {source}: {e} (pass --baseline PATH, or --baseline none to skip it)") from None
    return model, tok, name, base, base_tok, source


def _model_folder(model: nn.Module, given: str | None, stack: ExitStack) -> str:
    """A folder a trial child can load ``model`` from: ``given`` when it is one, else a temporary save."""
    if given is not None and Path(given).is_dir() and (Path(given) / "config.json").is_file():
        return given
    tmp = tempfile.mkdtemp(prefix="linconv-bench-")
    stack.callback(shutil.rmtree, tmp, True)
    model.save_pretrained(tmp, safe_serialization=True)
    return tmp


def run_bench(
    settings: BenchSettings,
    *,
    on_update: Callable[[BenchResult], None] | None = None,
    progress: Progress | None = None,
    status: Callable[[str], None] | None = None,
) -> BenchResult:
    """Run the benchmark (see the module docstring). ``status(text)`` reports setup steps."""
    s = settings.resolve()
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _run(s, on_update, progress or (lambda *a: None), status or (lambda text: None))
    finally:
        torch.set_num_threads(threads)


def _run(s: BenchSettings, on_update, progress: Progress, say: Callable[[str], None]) -> BenchResult:
    from linconv.data import SPLITS, load_text, tokenize, windows

    device, dtype = torch.device(s.device), parse_dtype(s.dtype)
    say("loading the models…")
    model, tok, name, base, base_tok, base_name = _load_models(s, device, dtype)
    models = {"linearized": model, **({"original": base} if base is not None else {})}
    result = BenchResult(s, environment(device, next(model.parameters()).dtype, s.threads))
    result.models = {"linearized": model_info(model, name), **({"original": model_info(base, base_name)} if base is not None else {})}
    if base is not None and not same_tokenizer(tok, base_tok):
        raise LinconvError(
            f"the checkpoint and the baseline {base_name} use different tokenizers; their perplexities "
            "are not comparable (pass --baseline with the original model, or --baseline none)"
        )

    tokens = None
    needs_tokenizer = [t for t in s.tasks if t in ("ppl", "spec", "longppl", "downstream", "passkey")]
    if needs_tokenizer and tok is None:
        raise LinconvError(
            f"{name} has no tokenizer files, needed for perplexity and prompts; save them into the folder or drop "
            f"{', '.join(needs_tokenizer)} from --tasks"
        )
    if {"ppl", "spec", "longppl"} & set(s.tasks):
        say("reading the text…")
        spec, split = (None, s.text) if s.text in SPLITS else (s.text, "heldout")
        text = load_text(spec, split)
        tokens = tokenize(tok, text)
        usable = windows(tokens, s.ppl_window, s.ppl_tokens or None)  # raises when shorter than one window
        result.text = {"source": s.text or "heldout", "characters": len(text), "tokens": tokens.numel(), "tokens_used": usable.numel()}
        if "longppl" in s.tasks and tokens.numel() < s.long_tokens:
            raise LinconvError(f"the text has {tokens.numel():,} tokens, fewer than --long-tokens {s.long_tokens:,}")
    if "maxlen" in s.tasks and s.memory_budget_gib is not None:
        budget = int(s.memory_budget_gib * GIB)
        for role, m in models.items():
            if weights_bytes(m) >= budget:
                raise LinconvError(
                    f"--memory-budget {s.memory_budget_gib:g} GiB is smaller than the "
                    f"{role} model: its weights alone are {weights_bytes(m) / GIB:.2f} GiB"
                )
        if device.type == "cuda" and budget > torch.cuda.get_device_properties(device).total_memory:
            raise LinconvError(f"--memory-budget {s.memory_budget_gib:g} GiB is more than the device's memory")

    def both():
        return [(role, models[role]) for role in ROLES if role in models]

    tasks = {
        "leakage": lambda: _leakage(result, model, progress),
        "ppl": lambda: _perplexity(result, both(), tokens, s, progress),
        "speed": lambda: _speed(result, both(), s, progress),
        "spec": lambda: _spec(result, both(), tokens, s, progress),
        "downstream": lambda: run_evaluation("downstream", result, both(), tok, s, progress),
        "longppl": lambda: run_evaluation("longppl", result, both(), tok, s, progress, tokens),
        "passkey": lambda: run_evaluation("passkey", result, both(), tok, s, progress),
        "maxlen": lambda: _maxlen(result, both(), s, device, progress, say, {"linearized": s.checkpoint, "original": base_name}),
    }
    for task in ORDER:
        if task not in s.tasks:
            continue
        try:
            tasks[task]()
        except LinconvError as e:
            result.errors.append({"task": task, "message": str(e)})
            break
        except Exception as e:
            result.errors.append({"task": task, "message": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            if on_update is not None:
                on_update(result)
            raise
        result.completed.append(task)
        if on_update is not None:
            on_update(result)
    if result.errors and on_update is not None:
        on_update(result)
    return result


def _leakage(result: BenchResult, model: nn.Module, progress: Progress) -> None:
    progress("leakage · linearized", 0, 1, "")
    result.leakage = leakage_check(model)
    progress("leakage · linearized", 1, 1, "leaks!" if result.leakage.leaks else "causal")


def _perplexity(result: BenchResult, models, tokens, s: BenchSettings, progress: Progress) -> None:
    for role, m in models:
        label = f"perplexity · {role}"
        result.perplexity[role] = perplexity(
            m,
            tokens,
            window=s.ppl_window,
            max_tokens=s.ppl_tokens or None,
            progress=lambda done, total, label=label: progress(label, done, total, f"{done}/{total} windows"),
        )


def _speed(result: BenchResult, models, s: BenchSettings, progress: Progress) -> None:
    for role, m in models:
        label = f"speed · {role}"
        result.speed[role] = speed(
            m,
            s.contexts,
            decode_tokens=s.decode_tokens,
            repeats=s.repeats,
            prefill_chunk=s.prefill_chunk,
            progress=lambda done, total, label=label: progress(label, done, total, ""),
        )


def _spec(result: BenchResult, models, tokens, s: BenchSettings, progress: Progress) -> None:
    prompts = spec_prompts(tokens.tolist())
    for role, m in models:
        label = f"speculative · {role}"
        for i, (kind, prompt) in enumerate(prompts.items()):
            progress(label, i, len(prompts), kind)
            result.spec.append(spec_decode_point(m, role, kind, prompt, PromptLookup(num_tokens=8, max_candidates=4), s.spec_tokens))
        progress(label, len(prompts), len(prompts), "done")


def _maxlen(result: BenchResult, models, s: BenchSettings, device, progress: Progress, say, given: dict) -> None:
    budget = None if s.memory_budget_gib is None else int(s.memory_budget_gib * GIB)
    with ExitStack() as stack:
        if device.type == "cuda":
            cuda_budget(device, budget)
            stack.callback(cuda_budget, device, None)
        else:
            say("saving the models for the max-length trial processes…")
            folders = {role: _model_folder(m, given.get(role), stack) for role, m in models}
        for role, m in models:
            with ExitStack() as alone:
                if device.type == "cuda":  # the budget is this model's alone: park the others in CPU memory
                    for other_role, other in models:
                        if other_role != role:
                            other.to("cpu")
                            alone.callback(other.to, device)
                    torch.cuda.empty_cache()
                for mode in MODES:
                    result.max_length.setdefault(mode, {})[role] = _search(
                        role, m, mode, s, device, budget, progress, folders if device.type != "cuda" else None
                    )


def _search(role: str, m: nn.Module, mode: str, s: BenchSettings, device, budget, progress: Progress, folders) -> MaxLenResult:
    label = f"max length ({mode}) · {role}"
    kwargs = dict(timeout_s=s.trial_timeout_s, new_tokens=s.maxlen_new_tokens, prefill_chunk=s.prefill_chunk)
    if device.type == "cuda":
        runner = CudaTrial(m, mode, **kwargs)
    else:
        dtype = str(next(m.parameters()).dtype).removeprefix("torch.")
        runner = ProcessTrial(folders[role], mode, budget_bytes=budget, dtype=dtype, threads=s.threads, **kwargs)
    count = [0]

    def trial(n: int):
        progress(label, count[0], None, f"trying {n:,} tokens")
        r = runner(n)
        count[0] += 1
        progress(label, count[0], None, f"{n:,} tokens: {r.outcome}")
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
    progress(label, count[0], count[0], f"{found.max_length:,} tokens ({found.bound})")  # a total ends the bar's clock
    return found
