"""Human-readable results: rich tables on stdout. Library code returns data; this prints it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from linconv.bench.base import ROLES
from linconv.bench.run import SCHEMA_VERSION
from linconv.bench.tasks import TASKS
from linconv.report_eval import eval_plot_path, eval_tables, save_figure, write_eval_plot

stdout = Console()


def print_table(table: Table) -> None:
    stdout.print(table)


def _layers(layers: list[int]) -> str:
    return ",".join(map(str, layers)) if layers else "none"


def conversion_table(summary, output) -> Table:
    """The summary printed at the end of ``linconv convert``."""
    table = Table(title=f"Converted → {output}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("architecture", summary.architecture)
    table.add_row("variant", summary.variant)
    table.add_row("layers converted", f"{len(summary.converted)} of {summary.layers}")
    table.add_row("layers kept (softmax)", _layers(summary.kept))
    table.add_row("group size / sinks / conv taps", f"{summary.group_size} / {summary.sinks} / {summary.conv_kernel}")
    table.add_row("parameters added", f"{summary.params_added:,}")
    return table


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def generation_line(result) -> str:
    """The final line of ``linconv generate``: token counts, prefill and decode speed, state size."""
    generated = sum(map(len, result.tokens))
    reasons = ", ".join(sorted(set(result.finish_reasons)))
    decode = f"{result.decode_tokens_per_s:.1f} tok/s" if result.token_seconds else "n/a"
    return (
        f"prompt {sum(result.prompt_tokens)} tokens · generated {generated} tokens · "
        f"prefill {result.prefill_tokens_per_s:.1f} tok/s · decode {decode} · "
        f"state {_bytes(result.state_bytes_end)} · stopped: {reasons}"
    )


# --- linconv bench: tables, a terminal chart, JSON, plots ----------------------------------------
# Every ratio is linearized ÷ original (perplexity: lower is better; everything else: higher is better).
# A table reads its task's result, ``result.results[name]`` (see linconv.bench.tasks).


def _num(x: float | None, digits: int = 1) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:,.{digits}f}"


def _ratio(lin: float | None, orig: float | None, at_least: bool = False) -> str:
    if not lin or not orig or lin != lin or orig != orig:
        return "–"
    return f"{'≥ ' if at_least else ''}{lin / orig:.2f}×"


def _gib(n: int | None) -> str:
    return "–" if n is None else f"{n / 1024**3:.2f} GiB"


def bench_header_table(result) -> Table:
    """Which models, on what, with which settings."""
    env, s = result.environment, result.settings
    table = Table(title="linconv bench", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for role in ROLES:
        info = result.models.get(role)
        if info:
            n = info["parameters"]
            size = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
            table.add_row(role, f"{info['name']} · {size} parameters · {info['dtype']}")
        else:
            table.add_row(role, "none (--baseline none)")
    table.add_row("device", f"{env['device']} ({env['device_name']}) · {env['threads']} threads · torch {env['torch']}")
    table.add_row("tasks", ", ".join(s.tasks))
    for note in result.notes:
        table.add_row("adjusted", note)
    return table


def _by_role(result, task: str) -> tuple[dict | None, object]:
    """A per-model task's results (role -> result) and any one of them, for the settings they share;
    (None, None) when the task did not run."""
    by_role = result.results.get(task)
    return (by_role, next(iter(by_role.values()))) if by_role else (None, None)


def perplexity_table(result) -> Table | None:
    ppl, any_ = _by_role(result, "ppl")
    if ppl is None:
        return None
    src = (result.text or {}).get("source", "text")
    title = f"Perplexity · {src}: {any_.windows} windows × {any_.window} tokens = {any_.tokens:,} tokens ({any_.scored:,} scored)"
    table = Table(title=title)
    table.add_column("")
    for col in (*ROLES, "ratio"):
        table.add_column(col, justify="right")
    o, lin = ppl.get("original"), ppl.get("linearized")
    get = lambda r, f: None if r is None else f(r)
    rows = [
        ("perplexity", lambda r: r.perplexity, 2),
        ("NLL (nats/token)", lambda r: r.nll, 3),
        ("forward tokens/s", lambda r: r.tokens_per_s, 0),
    ]
    for label, f, digits in rows:
        table.add_row(label, _num(get(o, f), digits), _num(get(lin, f), digits), _ratio(get(lin, f), get(o, f)))
    return table


def _maxlen_cell(r) -> str:
    if r is None:
        return "–"
    if r.bound == "cap":
        return f"{r.max_length:,}\n[dim]cap[/]"
    return f"{r.max_length:,}\n[dim]{r.bound} at {r.first_failure:,}[/]"


def maxlen_table(result) -> Table | None:
    ml = result.results.get("maxlen")
    if not ml:
        return None
    any_ = next(iter(next(iter(ml.values())).values()))
    budget = "device memory" if any_.budget_bytes is None else _gib(any_.budget_bytes)
    where = "per trial process (RSS)" if result.environment["device"] == "cpu" else "of device memory"
    title = (
        f"Max sequence length (tokens) · budget {budget} {where} · trial limit {any_.timeout_s:g} s · "
        f"cap {any_.cap:,} · granularity {any_.granularity:,}"
    )
    table = Table(title=title)
    table.add_column("")
    for col in (*ROLES, "ratio"):
        table.add_column(col, justify="right")
    labels = {"forward": "one forward (as perplexity)", "generate": "prefill + {n} generated"}
    for mode, pair in ml.items():
        o, lin = pair.get("original"), pair.get("linearized")
        n = (lin or o).new_tokens
        capped = lin is not None and o is not None and lin.bound == "cap" and o.bound != "cap"  # the true ratio is larger
        ratio = _ratio(lin and lin.max_length, o and o.max_length, at_least=capped)
        table.add_row(labels.get(mode, mode).format(n=n), _maxlen_cell(o), _maxlen_cell(lin), ratio)
    loaded = [ml_r.loaded_bytes for pair in ml.values() for ml_r in pair.values()]
    if any(b is not None for b in loaded):
        first = next(iter(ml.values()))
        table.add_row(
            "[dim]memory with the model loaded[/]",
            *(f"[dim]{_gib(first[r].loaded_bytes) if r in first else '–'}[/]" for r in ROLES),
            "",
        )
    return table


def speed_table(result) -> Table | None:
    sp, any_ = _by_role(result, "speed")
    if sp is None:
        return None
    repeats = any_.points[0].repeats if any_.points else 0
    title = (
        f"Tokens/s · prefill in chunks of {any_.prefill_chunk} (median of {repeats}), then {any_.decode_tokens} greedy tokens (median step)"
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("context", justify="right")
    for col in ("prefill\norig", "prefill\nlin", "\n×", "decode\norig", "decode\nlin", "\n×", "state\norig", "state\nlin"):
        table.add_column(col, justify="right")
    o, lin = sp.get("original"), sp.get("linearized")
    opts = {p.context: p for p in o.points} if o else {}
    lpts = {p.context: p for p in lin.points} if lin else {}
    for ctx in sorted(set(opts) | set(lpts)):
        a, b = opts.get(ctx), lpts.get(ctx)
        table.add_row(
            f"{ctx:,}",
            _num(a and a.prefill_tokens_per_s, 0),
            _num(b and b.prefill_tokens_per_s, 0),
            _ratio(b and b.prefill_tokens_per_s, a and a.prefill_tokens_per_s),
            _num(a and a.decode_tokens_per_s, 1),
            _num(b and b.decode_tokens_per_s, 1),
            _ratio(b and b.decode_tokens_per_s, a and a.decode_tokens_per_s),
            _bytes(a.state_bytes) if a else "–",
            _bytes(b.state_bytes) if b else "–",
        )
    return table


def leakage_table(result) -> Table | None:
    r = result.results.get("leakage")
    if r is None:
        return None
    if r.declared:
        table = Table(title="Leakage check (linearized) · not run: the model's config says it is not causal")
        table.add_column("verdict", justify="right")
        table.add_row(f"[bold red]LEAKS future tokens[/] ({r.declared})")
        return table
    title = f"Leakage check (linearized) · {r.seq_len} random tokens, cut points {', '.join(map(str, r.cut_points))}"
    table = Table(title=title + f", new parameters randomised: {r.randomized}")
    for col in ("max |Δ hidden| at ≤ t (relative)", "tolerance", "verdict"):
        table.add_column(col, justify="right")
    table.add_row(f"{r.max_change:.2e}", f"{r.tolerance:.0e}", "[bold red]LEAKS future tokens[/]" if r.leaks else "[green]causal[/]")
    return table


def decode_chart(result, width: int = 40) -> str | None:
    """Decode tokens/s against context as horizontal bars (rich markup), or None without speed data."""
    sp = result.results.get("speed")
    if not sp:
        return None
    series = {role: {p.context: p.decode_tokens_per_s for p in sp[role].points} for role in ROLES if role in sp}
    top = max((v for s in series.values() for v in s.values()), default=0) or 1.0
    colors = {"original": "yellow", "linearized": "cyan"}
    lines = ["[bold]decode tokens/s vs context[/]"]
    for ctx in sorted({c for s in series.values() for c in s}):
        for i, (role, s) in enumerate(series.items()):
            if ctx in s:
                bar = "█" * max(1, round(width * s[ctx] / top))
                head = f"{ctx:>8,}" if i == 0 else " " * 8
                lines.append(f"{head} {role:<10} [{colors[role]}]{bar}[/] {s[ctx]:.1f}")
    return "\n".join(lines)


def spec_table(result) -> Table | None:
    """Speculative decoding vs plain greedy decoding, per model, prompt kind and draft."""
    points = result.results.get("spec")
    if not points:
        return None
    table = Table(title=f"Speculative decoding (greedy, {points[0].new_tokens} new tokens)")
    left = ("model", "prompt", "draft", "accept by depth", "draft tokens accepted: steps")
    columns = ("model", "prompt", "draft", "plain tok/s", "spec tok/s", "×", "accept", "accept by depth", "tok/step")
    for col in (*columns, "draft tokens accepted: steps", "same"):
        table.add_column(col, justify="left" if col in left else "right")
    for p in points:
        table.add_row(
            p.model,
            p.prompt,
            p.draft,
            f"{p.plain_tokens_per_s:.1f}",
            f"{p.spec_tokens_per_s:.1f}",
            f"{p.speedup:.2f}×",
            f"{p.acceptance_rate:.0%}",
            " ".join(f"{a:.0%}" for a in p.acceptance_by_depth),
            f"{p.mean_tokens_per_step:.2f}",
            str(p.histogram),
            "yes" if p.identical else "[red]NO[/]",
        )
    return table


def print_bench(result) -> None:
    """Every table of a bench result that has data, then the chart, then the evaluations' tables."""
    for table in (
        bench_header_table(result),
        leakage_table(result),
        perplexity_table(result),
        speed_table(result),
        spec_table(result),
        maxlen_table(result),
    ):
        if table is not None:
            stdout.print(table)
    chart = decode_chart(result)
    if chart:
        stdout.print(chart, highlight=False)
    for table in eval_tables(result):
        stdout.print(table)


def _plain(x):
    """JSON-safe copy: tuples -> lists, NaN/inf -> None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def bench_json(result) -> dict:
    """The result as a JSON object with a stable schema (``schema_version``): the run's settings and
    environment, then one key per registered task, ``null`` for a task that did not run."""
    out = {
        "schema_version": SCHEMA_VERSION,
        "status": result.status,
        "created": result.created,
        "settings": asdict(result.settings),
        "environment": result.environment,
        "models": {role: result.models.get(role) for role in ROLES},
        "text": result.text,
        **{task.key: task.json(result.results[name], result.settings) if name in result.results else None for name, task in TASKS.items()},
        "completed": list(result.completed),
        "errors": list(result.errors),
        "notes": list(result.notes),
    }
    return _plain(out)


def write_json(result, path) -> None:
    """Write :func:`bench_json` to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(bench_json(result), indent=2) + "\n")
    os.replace(tmp, path)


def write_plot(result, path) -> bool:
    """PNG of tokens/s and memory against context length (matplotlib, Agg backend); False if no data."""
    import matplotlib  # heavy (~0.5 s) and needed by --plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp, ml = result.results.get("speed", {}), result.results.get("maxlen", {})
    if not sp and not ml:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = {"original": "tab:orange", "linearized": "tab:blue"}
    for role in ROLES:
        if role in sp:
            pts = sp[role].points
            ctx = [p.context for p in pts]
            axes[0].plot(ctx, [p.decode_tokens_per_s for p in pts], "o-", color=colors[role], label=role)
            axes[1].plot(ctx, [p.prefill_tokens_per_s for p in pts], "o-", color=colors[role], label=role)
            axes[2].plot(ctx, [p.state_bytes / 2**20 for p in pts], "o-", color=colors[role], label=f"{role}: decoding state")
        trials = [t for t in (ml.get("generate", {}).get(role).trials if ml.get("generate", {}).get(role) else []) if t.peak_bytes]
        if trials:
            ok = [t for t in trials if t.outcome == "ok"]
            bad = [t for t in trials if t.outcome != "ok"]
            axes[2].plot(
                [t.length for t in ok],
                [t.peak_bytes / 2**20 for t in ok],
                "s",
                color=colors[role],
                alpha=0.6,
                label=f"{role}: peak, prefill+generate (ok)",
            )
            if bad:
                axes[2].plot(
                    [t.length for t in bad], [t.peak_bytes / 2**20 for t in bad], "x", color=colors[role], label=f"{role}: peak at failure"
                )
    budget = next((r.budget_bytes for pair in ml.values() for r in pair.values() if r.budget_bytes), None) if ml else None
    if budget:
        axes[2].axhline(budget / 2**20, color="gray", ls="--", lw=1, label="memory budget")
    titles = ("decode tokens/s", "prefill tokens/s", "memory (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    env = result.environment
    save_figure(fig, path, f"linconv bench · {env['device']} · {env['dtype']} · {env['threads']} threads")
    return True


def write_plots(result, path) -> list[Path]:
    """The PNGs of ``--plot PATH``: tokens/s and memory at ``path`` (:func:`write_plot`), the evaluations'
    figure beside it (:func:`eval_plot_path`; at ``path`` itself when there is no speed or memory data)."""
    path = Path(path)
    written = [path] if write_plot(result, path) else []
    evals = eval_plot_path(path) if written else path
    return written + ([evals] if write_eval_plot(result, evals) else [])


def speculative_line(result) -> str:
    """The last line of ``linconv generate --spec-decode`` (after :func:`generation_line`)."""
    return (
        f"speculative: {result.steps} steps ({result.mean_tokens_per_step:.2f} tokens per step), "
        f"acceptance {result.acceptance_rate:.0%}, accepted per step {result.histogram}"
    )
