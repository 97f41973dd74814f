"""Tables and plots of the field's evaluations in ``linconv bench``: downstream accuracy, perplexity by
position, the passkey grid, each read from ``result.results[name]`` (see linconv.bench.tasks).
:mod:`linconv.report` prints and plots them with the other tasks'; this module also holds the
figure-saving step both bench figures share. Ratios are linearized ÷ original (accuracy: higher is
better; perplexity: lower is better)."""

from __future__ import annotations

import math

from rich.table import Table

from linconv.bench.base import ROLES


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _x(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.2f}×"


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else f"{n:,}"


def downstream_table(result) -> Table | None:
    r = result.results.get("downstream")
    if r is None:
        return None
    limit = f" · at most {r.limit} items per task" if r.limit else ""
    skipped = "\n".join(f"[yellow]{task}: skipped, {why}[/]" for task, why in r.unavailable.items())
    table = Table(title=f"Downstream accuracy (zero-shot, log-likelihood){limit}", caption=skipped or None, caption_justify="left")
    table.add_column("task")
    table.add_column("items", justify="right")
    for col in ("acc\norig", "acc\nlin", "\n×", "acc_norm\norig", "acc_norm\nlin"):
        table.add_column(col, justify="right")
    for t in r.tasks:
        name = t.task if t.runner == "lm-eval" else f"{t.task} [dim](scored by linconv)[/]"
        table.add_row(
            name,
            f"{t.items:,}",
            *(_pct(t.acc.get(role)) for role in ROLES),
            _x(t.ratio),
            *(_pct(t.acc_norm.get(role)) for role in ROLES),
        )
    return table


def long_ppl_table(result) -> Table | None:
    r = result.results.get("longppl")
    if r is None:
        return None
    trained = f" · trained context {r.trained_context:,}" if r.trained_context else ""
    table = Table(title=f"Perplexity by position · {r.tokens:,} tokens of one text, prefill in chunks of {r.chunk:,}{trained}")
    for col in ("positions", "original", "linearized", "ratio"):
        table.add_column(col, justify="right")
    for b in r.buckets:
        past = r.trained_context is not None and b.start >= r.trained_context
        span = f"{_tokens(b.start) if b.start else '0'}–{_tokens(b.end)}" + (" [dim](past training)[/]" if past else "")
        ppl = [f"{math.exp(b.nll[role]):.2f}" if role in b.nll else "–" for role in ROLES]
        table.add_row(span, *ppl, _x(b.ratio))
    return table


def passkey_table(result) -> Table | None:
    r = result.results.get("passkey")
    if r is None:
        return None
    grids = {role: r.accuracy(role) for role in ROLES if r.accuracy(role)}

    def pair(values: list[float]) -> str:
        return " / ".join(f"{100 * v:.0f}" for v in values)

    overall = pair([r.overall(role) for role in grids])
    title = f"Passkey retrieval · % right, {' / '.join(grids)} · {r.trials} keys per cell, greedy · all cells {overall}"
    table = Table(title=title)
    table.add_column("tokens \\ depth", justify="right")
    for d in r.depths:
        table.add_column(f"{d:g}", justify="center")
    table.add_column("mean", justify="center")
    for i, n in enumerate(r.lengths):
        cells = [pair([g[i][j] for g in grids.values()]) for j in range(len(r.depths))]
        table.add_row(_tokens(n), *cells, pair([sum(g[i]) / len(g[i]) for g in grids.values()]))
    return table


def eval_tables(result) -> list[Table]:
    """The evaluation tables of a bench result that has them, in run order."""
    return [t for t in (downstream_table(result), long_ppl_table(result), passkey_table(result)) if t is not None]


def write_eval_plot(result, path) -> bool:
    """PNG of NLL against position (both models) and the passkey heatmaps; False when neither ran."""
    import matplotlib  # heavy (~0.5 s) and needed by --plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lp, pk = result.results.get("longppl"), result.results.get("passkey")
    panels = ([lp] if lp else []) + ([(pk, role) for role in ROLES if pk.accuracy(role)] if pk else [])
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    axes = list(axes[0])
    if lp:
        _nll_curve(axes.pop(0), lp)
    for ax, (r, role) in zip(axes, panels[1 if lp else 0 :]):
        grid = [[100 * v for v in row] for row in r.accuracy(role)]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(r.depths)), [f"{d:g}" for d in r.depths])
        ax.set_yticks(range(len(r.lengths)), [_tokens(n) for n in r.lengths])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("depth of the key")
        ax.set_ylabel("prompt tokens")
        ax.set_title(f"passkey accuracy (%) · {role}")
        fig.colorbar(image, ax=ax, fraction=0.046)
    env = result.environment
    save_figure(fig, path, f"linconv bench · evaluations · {env['device']} · {env['dtype']}")
    return True


def _nll_curve(ax, lp) -> None:
    colors = {"original": "tab:orange", "linearized": "tab:blue"}
    for role in ROLES:
        values = lp.curve.get(role)
        if values:
            x = [(a * b) ** 0.5 for a, b in zip([1, *lp.curve_ends[:-1]], lp.curve_ends)]  # geometric middles
            ax.plot(x, values, "-", color=colors[role], alpha=0.5, lw=1)
            mids = [(b.start + b.end) / 2 for b in lp.buckets]
            ax.plot(mids, [b.nll[role] for b in lp.buckets], "o-", color=colors[role], label=f"{role} (bucket mean)")
    if lp.trained_context:
        ax.axvline(lp.trained_context, color="gray", ls="--", lw=1, label="trained context")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("NLL (nats/token)")
    ax.set_title("NLL against position")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def eval_plot_path(path):
    """Where the evaluation figure goes when ``path`` already holds the speed and memory figure."""
    return path.with_name(f"{path.stem}-eval{path.suffix}")


def save_figure(fig, path, title: str) -> None:
    """Title, lay out, write as PNG and free a matplotlib figure."""
    import matplotlib.pyplot as plt  # heavy; the caller has imported it already to draw ``fig``

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
