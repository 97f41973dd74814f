"""``linconv bench``: the linearized model against its original, side by side."""

from __future__ import annotations

from pathlib import Path

import typer

from linconv.bench.downstream import DEFAULT_EVAL_TASKS
from linconv.cli.common import console, friendly, parse_device
from linconv.errors import LinconvError


def _d(key: str) -> str:
    """'CPU default X, CUDA Y' for a help text, straight from the defaults so they cannot drift."""
    from linconv.bench.run import CPU_DEFAULTS, CUDA_DEFAULTS

    show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else "the whole device" if v is None else f"{v:g}"
    return f"CPU default {show(CPU_DEFAULTS[key])}; CUDA {show(CUDA_DEFAULTS[key])}"


@friendly
def bench_command(
    checkpoint: str | None = typer.Argument(
        None, help="A linconv checkpoint folder (default: a fresh conversion of the built-in SmolLM2-135M-Instruct)."
    ),
    baseline: str = typer.Option(
        "auto", help="The original model to compare with: a folder, hub id or .gguf; 'auto' (the checkpoint's source) or 'none'."
    ),
    text: str | None = typer.Option(
        None,
        help="Perplexity text: a file, a folder of .txt, a datasets name, or a built-in split (heldout, britannica). Default: heldout.",
    ),
    tasks: str = typer.Option(
        "ppl,maxlen,speed,leakage",
        help=(
            "Comma-separated tasks: ppl, maxlen, speed, leakage (and spec, which --spec-decode adds); the evaluations "
            "downstream (lm-evaluation-harness accuracy), longppl (perplexity by position) and passkey (retrieval)."
        ),
    ),
    memory_budget: float | None = typer.Option(
        None,
        help=(
            "Max-length memory budget in GiB: on CPU the RSS of each trial "
            f"process, on CUDA a cap on device memory ({_d('memory_budget_gib')})."
        ),
    ),
    max_len_cap: int | None = typer.Option(None, help=f"Longest length the max-length search tries ({_d('max_len_cap')})."),
    trial_timeout: float | None = typer.Option(
        None, help=f"Seconds one max-length trial may work, model loading excluded ({_d('trial_timeout_s')})."
    ),
    granularity: int | None = typer.Option(
        None, help=f"The max-length bisection stops when the limit is known to this many tokens ({_d('granularity')})."
    ),
    contexts: str | None = typer.Option(None, help=f"Context lengths for tokens/s ({_d('contexts')})."),
    decode_tokens: int | None = typer.Option(None, help=f"Tokens generated per speed measurement ({_d('decode_tokens')})."),
    repeats: int | None = typer.Option(None, help=f"Prefills per context length; the median is reported ({_d('repeats')})."),
    prefill_chunk: int | None = typer.Option(
        None, help=f"Prompt tokens per prefill forward, for speed and max length ({_d('prefill_chunk')})."
    ),
    ppl_window: int = typer.Option(1024, help="Tokens per perplexity window (non-overlapping)."),
    ppl_tokens: int | None = typer.Option(None, help=f"Tokens of the text used for perplexity, 0 for all ({_d('ppl_tokens')})."),
    spec_decode: bool = typer.Option(
        False,
        "--spec-decode",
        help="Also measure greedy speculative decoding (prompt lookup) vs plain decoding, on grounded and open prompts.",
    ),
    spec_tokens: int = typer.Option(64, help="Tokens generated per speculative-decoding measurement."),
    eval_tasks: str = typer.Option(
        ",".join(DEFAULT_EVAL_TASKS),
        help="downstream: lm-evaluation-harness tasks, and next_line (built-in, offline: the true next line of a play among 4).",
    ),
    eval_limit: int | None = typer.Option(None, help="downstream: at most this many items per task (quick runs)."),
    eval_include: Path | None = typer.Option(None, help="downstream: a folder of your own lm-evaluation-harness task YAMLs."),
    long_tokens: int = typer.Option(32768, help="longppl: tokens of the text read as one document (buckets 0-1K, 1-2K, 2-4K, ...)."),
    passkey_lengths: str | None = typer.Option(None, help=f"passkey: prompt lengths in tokens, e.g. 1K,4K ({_d('passkey_lengths')})."),
    passkey_depths: str = typer.Option("0,0.25,0.5,0.75,1", help="passkey: depths of the key in the filler, 0 = start, 1 = end."),
    passkey_trials: int | None = typer.Option(None, help=f"passkey: keys per (length, depth) cell ({_d('passkey_trials')})."),
    json_path: Path | None = typer.Option(None, "--json", help="Write every figure and the settings here (also after a failed task)."),
    plot: Path | None = typer.Option(
        None, help="Write a PNG of tokens/s and memory against context length (and of NLL by position and the passkey grid)."
    ),
    device: str | None = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str | None = typer.Option(None, help="fp32, bf16 or fp16 (default: the checkpoint's; fp32 for the default model)."),
    threads: int | None = typer.Option(None, help="CPU threads (default: torch's; on a CPU shared with other jobs 1 can be much faster)."),
) -> None:
    """Measure perplexity, max sequence length, tokens/s and causality, original vs linearized."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from linconv import report, report_eval
    from linconv.bench.run import BenchSettings, run_bench

    if plot is not None and plot.suffix.lower() != ".png":
        raise LinconvError(f"--plot must name a .png file, got {plot}")
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
        eval_tasks=eval_tasks,
        eval_limit=eval_limit,
        eval_include=None if eval_include is None else str(eval_include),
        long_tokens=long_tokens,
        passkey_lengths=passkey_lengths,
        passkey_depths=passkey_depths,
        passkey_trials=passkey_trials,
    )
    settings.resolve()  # bad options fail before any model is loaded

    def save(result) -> None:
        if json_path is not None:
            report.write_json(result, json_path)

    bars = Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    ids: dict[str, int] = {}

    def progress(label: str, done: float, total: float | None, detail: str) -> None:
        if label not in ids:
            ids[label] = bars.add_task(label, total=total, detail="")
        bars.update(ids[label], completed=done, total=total, detail=detail)

    def status(text: str) -> None:
        progress("setup", 0, None, text)

    with bars:
        result = run_bench(settings, on_update=save, progress=progress, status=status)
        if "setup" in ids:
            bars.update(ids["setup"], total=1, completed=1, detail="done")
    save(result)
    report.print_bench(result)
    report_eval.print_eval(result)
    if plot is not None:
        wrote = report.write_plot(result, plot)
        if wrote:
            console.print(f"plot: {plot}")
        eval_plot = report_eval.eval_plot_path(plot) if wrote else plot
        if report_eval.write_eval_plot(result, eval_plot):
            console.print(f"plot: {eval_plot}")
    if json_path is not None:
        console.print(f"results: {json_path}")
    if result.errors:
        error = result.errors[0]
        raise LinconvError(f"{error['task']}: {error['message']}" + (f" (partial results in {json_path})" if json_path else ""))
