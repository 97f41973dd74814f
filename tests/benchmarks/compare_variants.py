"""Every attention variant on the default model under one fine-tuning budget (run by hand; pytest
ignores this folder). Reproduces the paper's comparison and its ablations; picks linconv's defaults.

For each run: convert the default model (SmolLM2-135M-Instruct) with the run's options, measure the
held-out perplexity as converted, fine-tune it with the *same* settings for every run (attention
transfer, then LoRA; see ``--transfer-steps`` etc.; a variant without parameters of its own has nothing
to transfer and spends those steps on LoRA, so every run reads the same tokens), then measure the held-out perplexity again and
run the leakage check on the fine-tuned model. The original model is measured first, on the same
windows. Runs:

- every registered causal variant with its defaults, plus ``linformer`` (forced: not causal);
- the paper's ablations of ``augmented``: without the conv, without grouping (its global linear part
  over all tokens, plus the conv), the conv unmasked (reads 31 future tokens: must be caught as
  leaking), and a hybrid that keeps every fifth layer softmax;
- the group size of ``augmented-softmax`` (every other run uses the paper's 64), and at 256 without
  the conv and as a hybrid.

Resumable: one JSON record per run in ``--out`` (a finished run is skipped); ``--only`` selects runs.
``--report`` prints the table (rich), writes ``results.md`` and ``results.png`` from the records.

    python tests/benchmarks/compare_variants.py --out runs/compare [--only a,b] [--threads 2]
        [--transfer-steps 40] [--lora-steps 80] [--seq-len 512] [--eval-windows 8] [--report]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from records import read_records, run_pending, start

from linconv.config import LinearizeConfig

RUNS: dict[str, tuple[str, dict]] = {
    name: (what, {"group_size": 64, "sinks": 0, **opts})  # the paper's group size unless a run says otherwise; no sinks
    for name, what, opts in [
        ("relu", "ReLU kernel (paper baseline)", dict(attention="relu")),
        ("elu", "ELU+1 kernel", dict(attention="elu")),
        ("performer", "FAVOR+ random features", dict(attention="performer")),
        ("transnormer", "TransNormer", dict(attention="transnormer")),
        ("flash-local", "FLASH local half", dict(attention="flash-local")),
        ("flash-global", "FLASH global half", dict(attention="flash-global")),
        ("yoso", "YOSO local score", dict(attention="yoso")),
        ("hedgehog", "Hedgehog learnable map", dict(attention="hedgehog")),
        ("linformer", "Linformer (NOT causal, forced)", dict(attention="linformer", allow_noncausal=True)),
        ("augmented", "paper: grouped relu² + global + DWConv", dict(attention="augmented")),
        ("augmented/no-conv", "ablation: no DWConv", dict(attention="augmented", conv_kernel=0)),
        ("augmented/no-groups", "ablation: no grouping (global linear + DWConv)", dict(attention="relu", conv_kernel=32)),
        (
            "augmented/unmasked-conv",
            "ablation: conv not masked (leaks)",
            dict(attention="augmented", conv_mask=False, allow_noncausal=True),
        ),
        ("augmented/hybrid", "hybrid: every 5th layer softmax", dict(attention="augmented", softmax_every=5)),
        ("augmented-softmax", "grouped softmax + hedgehog global + DWConv", dict(attention="augmented-softmax")),
        ("augmented-softmax/g128", "… group 128", dict(attention="augmented-softmax", group_size=128)),
        ("augmented-softmax/g256", "… group 256", dict(attention="augmented-softmax", group_size=256)),
        ("augmented-softmax/g256-no-conv", "… group 256, no DWConv", dict(attention="augmented-softmax", group_size=256, conv_kernel=0)),
        (
            "augmented-softmax/g256-hybrid",
            "… group 256, every 5th layer softmax",
            dict(attention="augmented-softmax", group_size=256, softmax_every=5),
        ),
    ]
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    p.add_argument("--transfer-steps", type=int, default=40)
    p.add_argument("--lora-steps", type=int, default=80)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--transfer-lr", type=float, default=1e-2)
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows of 1024 tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only print/write the table from the records")
    return p.parse_args()


def heldout_ppl(model, ids, windows: int) -> float:
    from linconv.bench.perplexity import perplexity

    return perplexity(model, ids, window=1024, max_tokens=1024 * windows).perplexity


def run_one(name: str, opts: dict, base, tokenizer, ids, args) -> dict:
    from linconv import convert
    from linconv.bench.leakage import leakage_check
    from linconv.checkpoint import load, save_checkpoint
    from linconv.finetune import FinetuneConfig, finetune
    from linconv.models.hf import linconv_tensor_names

    cfg = LinearizeConfig(**opts).validate()
    model = convert(base, cfg)
    converted = heldout_ppl(model, ids, args.eval_windows)
    params = dict(model.named_parameters())
    transfer = args.transfer_steps if any(n in params for n in linconv_tensor_names(model)) else 0
    ft = FinetuneConfig(  # nothing to transfer: those steps go to LoRA, so every run sees the same tokens
        transfer_steps=transfer,
        lora_steps=args.lora_steps + args.transfer_steps - transfer,
        seq_len=args.seq_len,
        lr=args.lr,
        transfer_lr=args.transfer_lr,
        loss="ce",  # the comparison's one setting (it predates the distilling default)
    )
    work = Path(tempfile.mkdtemp(prefix="linconv-compare-"))
    try:
        save_checkpoint(model, tokenizer, work / "converted", card={"run": name})
        del model
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = finetune(work / "converted", work / "tuned", ft)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        tuned, _ = load(work / "tuned")
        tokens = sum(s.tokens for s in result.stages)
        leak = leakage_check(tuned)
        final = heldout_ppl(tuned, ids, args.eval_windows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "name": name,
        "options": cfg.to_dict(),
        "converted_ppl": converted,
        "finetuned_ppl": final,
        "leaks": leak.leaks,
        "leak_max_change": leak.max_change,
        "tokens": tokens,
        "cpu_minutes": cpu / 60,
        "wall_minutes": wall / 60,
        "finetune": ft.to_dict(),
        "losses": {s.name: s.losses for s in result.stages},
    }


def main() -> None:
    args = parse_args()
    base, tokenizer = start(args, report)
    from linconv.data import load_text, tokenize

    ids = tokenize(tokenizer, load_text(None, "heldout"))
    run_pending(
        args.out,
        args.only,
        RUNS,
        lambda: {"finetuned_ppl": heldout_ppl(base, ids, args.eval_windows)},
        lambda name: run_one(name, RUNS[name][1], base, tokenizer, ids, args),
        lambda rec: f"{rec['converted_ppl']:.1f} -> {rec['finetuned_ppl']:.1f}  leaks={rec['leaks']}  {rec['cpu_minutes']:.1f} CPU-min",
    )
    report(args.out)


def report(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    records = read_records(out)
    orig = records.pop("original", None)
    rows = [records[n] for n in RUNS if n in records]
    base = orig["finetuned_ppl"] if orig else float("nan")
    table = Table(title="held-out perplexity, default model (original first)")
    head = ["run", "what", "as converted", "fine-tuned", "÷ original", "leaks", "tokens", "minutes", "CPU-min"]
    for col in head:
        table.add_column(col, justify="left" if col in ("run", "what", "leaks") else "right")
    md = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * 3 + "---|" + "---:|" * 3]
    if orig:
        cells = ["original", "softmax (SmolLM2-135M-Instruct)", "", f"{base:.1f}", "1.00", "", "", "", ""]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    for r in rows:
        cells = [
            r["name"],
            r["what"],
            f"{r['converted_ppl']:.1f}",
            f"{r['finetuned_ppl']:.1f}",
            f"{r['finetuned_ppl'] / base:.2f}",
            "LEAKS" if r["leaks"] else "no",
            f"{r['tokens']:,}",
            f"{r['wall_minutes']:.1f}",
            f"{r['cpu_minutes']:.1f}",
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    (out / "results.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    names = [r["name"] for r in rows][::-1]
    ax.barh(names, [min(r["converted_ppl"], 1e5) for r in rows][::-1], color="#bbbbbb", label="as converted", height=0.6)
    colors = ["#e67e22" if r["leaks"] else "#3b6ea8" for r in rows][::-1]
    ax.barh(names, [min(r["finetuned_ppl"], 1e5) for r in rows][::-1], color=colors, label="fine-tuned (orange: LEAKS)", height=0.35)
    if orig:
        ax.axvline(orig["finetuned_ppl"], color="#c0392b", ls="--", label=f"original {orig['finetuned_ppl']:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("held-out perplexity (log scale, lower is better)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=80)
    print(
        f"wrote {out / 'results.md'} and {out / 'results.png'}; mean tokens/run "
        f"{math.fsum(r['tokens'] for r in rows) / max(len(rows), 1):,.0f}"
    )


if __name__ == "__main__":
    main()
