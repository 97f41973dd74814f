"""``linconv bench``: the linearized model against its original, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from linconv import report
from linconv.bench.downstream import DEFAULT_EVAL_TASKS
from linconv.bench.run import CPU_DEFAULTS, CUDA_DEFAULTS, BenchSettings, run_bench
from linconv.bench.tasks import DEFAULT_TASKS, TASKS
from linconv.checkpoint import check_output
from linconv.cli.common import console, friendly, parse_device
from linconv.cli.progress import RichProgress
from linconv.compiled import compile_plan
from linconv.errors import LinconvError


def _d(key: str) -> str:
    """'CPU default X, CUDA Y' for a help text, straight from the defaults so they cannot drift."""
    show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else "the whole device" if v is None else f"{v:g}"
    return f"CPU default {show(CPU_DEFAULTS[key])}; CUDA {show(CUDA_DEFAULTS[key])}"


def _tasks_help() -> str:
    """Every registered task with its description, from the registry."""
    listed = ", ".join(f"{name} ({task.description})" for name, task in TASKS.items())
    return f"Comma-separated tasks: {listed}. --spec-decode adds spec."


@friendly
def bench_command(
    checkpoint: Annotated[
        str | None, typer.Argument(help="A linconv checkpoint folder (default: a fresh conversion of the built-in SmolLM2-135M-Instruct).")
    ] = None,
    baseline: Annotated[
        str, typer.Option(help="The original model to compare with: a folder, hub id or .gguf; 'auto' (the checkpoint's source) or 'none'.")
    ] = "auto",
    text: Annotated[
        str | None,
        typer.Option(
            help="Perplexity text: a file, a folder of .txt, a datasets name, or a built-in split (heldout, britannica). Default: heldout."
        ),
    ] = None,
    tasks: Annotated[str, typer.Option(help=_tasks_help())] = ",".join(DEFAULT_TASKS),
    memory_budget: Annotated[
        float | None,
        typer.Option(
            help=(
                "Max-length memory budget in GiB: on CPU the RSS of each trial "
                f"process, on CUDA a cap on device memory ({_d('memory_budget_gib')})."
            )
        ),
    ] = None,
    max_len_cap: Annotated[int | None, typer.Option(help=f"Longest length the max-length search tries ({_d('max_len_cap')}).")] = None,
    trial_timeout: Annotated[
        float | None, typer.Option(help=f"Seconds one max-length trial may work, model loading excluded ({_d('trial_timeout_s')}).")
    ] = None,
    granularity: Annotated[
        int | None, typer.Option(help=f"The max-length bisection stops when the limit is known to this many tokens ({_d('granularity')}).")
    ] = None,
    contexts: Annotated[str | None, typer.Option(help=f"Context lengths for tokens/s ({_d('contexts')}).")] = None,
    decode_tokens: Annotated[int | None, typer.Option(help=f"Tokens generated per speed measurement ({_d('decode_tokens')}).")] = None,
    repeats: Annotated[int | None, typer.Option(help=f"Prefills per context length; the median is reported ({_d('repeats')}).")] = None,
    prefill_chunk: Annotated[
        int | None, typer.Option(help=f"Prompt tokens per prefill forward, for speed and max length ({_d('prefill_chunk')}).")
    ] = None,
    ppl_window: Annotated[int, typer.Option(help="Tokens per perplexity window (non-overlapping).")] = 1024,
    ppl_tokens: Annotated[int | None, typer.Option(help=f"Tokens of the text used for perplexity, 0 for all ({_d('ppl_tokens')}).")] = None,
    spec_decode: Annotated[
        bool,
        typer.Option(
            "--spec-decode",
            help="Also measure greedy speculative decoding (every draft) vs plain decoding, on grounded and open prompts.",
        ),
    ] = False,
    spec_tokens: Annotated[int, typer.Option(help="Tokens generated per speculative-decoding measurement.")] = 64,
    spec_drafts: Annotated[
        str,
        typer.Option(
            help="Drafts compared by --spec-decode: auto (lookup + the checkpoint's medusa/eagle heads), lookup, medusa, eagle, model:PATH."
        ),
    ] = "auto",
    eval_tasks: Annotated[
        str,
        typer.Option(
            help="downstream: lm-evaluation-harness tasks, and next_line (built-in, offline: the true next line of a play among 4)."
        ),
    ] = ",".join(DEFAULT_EVAL_TASKS),
    eval_limit: Annotated[int | None, typer.Option(help="downstream: at most this many items per task (quick runs).")] = None,
    eval_include: Annotated[Path | None, typer.Option(help="downstream: a folder of your own lm-evaluation-harness task YAMLs.")] = None,
    long_tokens: Annotated[
        int, typer.Option(help="longppl: tokens of the text read as one document (buckets 0-1K, 1-2K, 2-4K, ...).")
    ] = 32768,
    passkey_lengths: Annotated[
        str | None, typer.Option(help=f"passkey: prompt lengths in tokens, e.g. 1K,4K ({_d('passkey_lengths')}).")
    ] = None,
    passkey_depths: Annotated[
        str, typer.Option(help="passkey: depths of the key in the filler, 0 = start, 1 = end.")
    ] = "0,0.25,0.5,0.75,1",
    passkey_trials: Annotated[int | None, typer.Option(help=f"passkey: keys per (length, depth) cell ({_d('passkey_trials')}).")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every figure and the settings here (also after a failed task).")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write a PNG of tokens/s and memory against context length (and PATH-eval.png: NLL by position, the passkey grid)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: the checkpoint's; fp32 for the default model).")] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: torch's; on a CPU shared with other jobs 1 can be much faster).")
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Speed: both models' decode steps through torch.compile (needs a C++ compiler; minutes on a CPU). Default: eager.",
        ),
    ] = None,
) -> None:
    """Measure perplexity, max sequence length, tokens/s and causality, original vs linearized."""
    if plot is not None and plot.suffix.lower() != ".png":
        raise LinconvError(f"--plot must name a .png file, got {plot}")
    for path in (json_path, plot, plot and report.eval_plot_path(plot)):
        if path is not None:
            check_output(path, folder=False, inputs=(checkpoint,))
    settings = BenchSettings(
        checkpoint=checkpoint,
        baseline=baseline,
        text=text,
        tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()) + (("spec",) if spec_decode else ()),
        device=str(parse_device(device)),
        dtype=dtype,
        memory_budget_gib=memory_budget,
        max_len_cap=max_len_cap,
        trial_timeout_s=trial_timeout,
        granularity=granularity,
        contexts=contexts,
        decode_tokens=decode_tokens,
        repeats=repeats,
        prefill_chunk=prefill_chunk,
        ppl_window=ppl_window,
        ppl_tokens=ppl_tokens,
        threads=threads,
        spec_tokens=spec_tokens,
        spec_drafts=tuple(d.strip() for d in spec_drafts.split(",") if d.strip()),
        eval_tasks=eval_tasks,
        eval_limit=eval_limit,
        eval_include=None if eval_include is None else str(eval_include),
        long_tokens=long_tokens,
        passkey_lengths=passkey_lengths,
        passkey_depths=passkey_depths,
        passkey_trials=passkey_trials,
    )
    settings.compile, note = compile_plan(settings.device, compile)
    if note:
        console.print(note, highlight=False)
    settings.resolve()  # bad options fail before any model is loaded

    def save(result) -> None:
        if json_path is not None:
            report.write_json(result, json_path)

    with RichProgress(width=34) as progress:
        result = run_bench(settings, on_update=save, progress=progress)
    save(result)
    report.print_bench(result)
    for written in report.write_plots(result, plot) if plot is not None else ():
        console.print(f"plot: {written}")
    if json_path is not None:
        console.print(f"results: {json_path}")
    if result.errors:
        error = result.errors[0]
        raise LinconvError(f"{error['task']}: {error['message']}" + (f" (partial results in {json_path})" if json_path else ""))
