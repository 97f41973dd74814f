"""Fine-tuning recipes measured off-domain: losses × training text on three texts (run by hand;
pytest ignores this folder). Issue 15's comparison; picks the default loss and text mix.

Every run converts the default model (SmolLM2-135M-Instruct) with the default recipe and the run's
conversion options (attention sinks, group size), fine-tunes it with the *same* budget
(``--transfer-steps`` + ``--lora-steps`` windows of ``--seq-len`` tokens) and the run's loss and
training text, then measures perplexity (16K tokens, windows of 1,024) on:

- ``plays``: the held-out plays (the training domain of the built-in text);
- ``britannica``: the built-in Britannica article (never trained on);
- ``third``: ``--third-text`` (default: the software licences of ``/usr/share/common-licenses``, GPL-3,
  LGPL-3, GFDL-1.3, Apache-2.0 and MPL-2.0 — modern legal English, in no training source).

The original model is measured first on the same windows. ``original+lora`` fine-tunes the original
(every layer kept softmax) with the same LoRA budget and loss as ``ce/plays``: how much of a recovery
is adaptation to the plays rather than recovery from linearization. Runs with ``selfgen`` mix a share
of text the original model wrote itself (``--text-mix selfgen:F``; sampled once per base model and
cached, its generation time recorded apart from the fine-tuning time).

Resumable: one JSON record per run in ``--out``; ``--only`` selects runs; ``--report`` prints the table
and writes ``results.md``. Run:

    python tests/benchmarks/compare_recipes.py --out runs/recipes [--only a,b] [--threads 2]
        [--transfer-steps 20] [--lora-steps 60] [--selfgen-share 0.5] [--third-text PATH] [--report]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from records import read_records, run_pending, start

LICENCES = ("GPL-3", "LGPL-3", "GFDL-1.3", "Apache-2.0", "MPL-2.0")
TEXTS = ("plays", "britannica", "third")
EVAL_TOKENS = 16_384

# name -> (what, LinearizeConfig options, FinetuneConfig options); "selfgen" in the text mix is
# replaced by --selfgen-share. The first rows are the recipe before attention sinks (``sinks`` 0); the
# ``sinksN`` rows keep the first N tokens visible to every group (256: the whole first group, today's default).
NO_SINKS = {"sinks": 0}
RUNS: dict[str, tuple[str, dict, dict]] = {
    "ce/plays": ("next-token loss, plays (the default before sinks)", NO_SINKS, {"loss": "ce"}),
    "kl/plays": ("distil the original, plays", NO_SINKS, {"loss": "kl"}),
    "kl/selfgen": ("distil the original, plays + own text", NO_SINKS, {"loss": "kl", "text_mix": "selfgen"}),
    "original+lora": ("the original + the same LoRA budget (CE, plays)", {"softmax_every": 1}, {"loss": "ce", "transfer_steps": 0}),
    "mix/plays": ("½ CE + ½ KL, plays", NO_SINKS, {"loss": "mix"}),
    "ce/selfgen": ("next-token loss, plays + own text", NO_SINKS, {"loss": "ce", "text_mix": "selfgen"}),
    "mix/selfgen": ("½ CE + ½ KL, plays + own text", NO_SINKS, {"loss": "mix", "text_mix": "selfgen"}),
    **{f"ce/plays/sinks{n}": (f"next-token loss, plays; {n} attention sinks", {"sinks": n}, {"loss": "ce"}) for n in (4, 16, 64, 128, 256)},
    "mix/plays/sinks256": ("½ CE + ½ KL, plays; 256 attention sinks", {"sinks": 256}, {"loss": "mix"}),
    "mix/plays/sinks48": ("½ CE + ½ KL, plays; 48 sinks (a 23.7 MB state)", {"sinks": 48}, {"loss": "mix"}),
    "mix/plays/g128": ("½ CE + ½ KL, plays; groups of 128, all 128 as sinks", {"group_size": 128, "sinks": 128}, {"loss": "mix"}),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    p.add_argument("--transfer-steps", type=int, default=20)
    p.add_argument("--lora-steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--selfgen-share", type=float, default=0.5)
    p.add_argument("--third-text", type=Path, default=None, help="the third text (default: software licences, see above)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only print/write the table from the records")
    return p.parse_args()


def third_text(path: Path | None) -> str:
    if path is not None:
        return path.read_text(encoding="utf-8")
    root = Path("/usr/share/common-licenses")
    missing = [n for n in LICENCES if not (root / n).is_file()]
    if missing:
        raise SystemExit(f"no {', '.join(missing)} in {root}; pass --third-text PATH")
    return "\n\n".join((root / n).read_text(encoding="utf-8") for n in LICENCES)


def perplexities(model, ids: dict[str, torch.Tensor]) -> dict[str, float]:
    from linconv.bench.perplexity import perplexity

    return {name: perplexity(model, t, window=1024, max_tokens=EVAL_TOKENS).perplexity for name, t in ids.items()}


def run_one(name: str, base, tokenizer, ids, args) -> dict:
    from linconv import convert
    from linconv.checkpoint import load, save_checkpoint
    from linconv.config import LinearizeConfig
    from linconv.finetune import FinetuneConfig, finetune
    from linconv.finetune.run import own_text_tokens
    from linconv.selfgen import SelfGenConfig, self_generated_text

    _, lin_opts, ft_opts = RUNS[name]
    ft_opts = dict(ft_opts)
    if ft_opts.get("text_mix") == "selfgen":
        ft_opts["text_mix"] = f"selfgen:{args.selfgen_share}"
    steps = {"transfer_steps": args.transfer_steps, "lora_steps": args.lora_steps}
    if ft_opts.get("transfer_steps") == 0:  # nothing to transfer: those steps go to LoRA (same tokens)
        steps = {"transfer_steps": 0, "lora_steps": args.transfer_steps + args.lora_steps}
    ft = FinetuneConfig(**{**ft_opts, **steps, "seq_len": args.seq_len})
    model = convert(base, LinearizeConfig(**lin_opts).validate())
    work = Path(tempfile.mkdtemp(prefix="linconv-recipes-"))
    try:
        save_checkpoint(model, tokenizer, work / "converted", card={"run": name})
        selfgen_s = 0.0
        if ft.text_mix:  # sample the own text first (cached per base model), so that its time is not the fine-tuning's
            tokens = own_text_tokens(ft, args.selfgen_share, ft.transfer_steps + ft.lora_steps)
            selfgen_s = self_generated_text(model, tokenizer, SelfGenConfig(tokens=tokens)).seconds  # when sampled (the cache keeps it)
        del model
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = finetune(work / "converted", work / "tuned", ft)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        tuned, _ = load(work / "tuned")
        ppl = perplexities(tuned, ids)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "name": name,
        "perplexity": ppl,
        "tokens": sum(s.tokens for s in result.stages),
        "cpu_minutes": cpu / 60,
        "wall_minutes": wall / 60,
        "selfgen_minutes": selfgen_s / 60,
        "finetune": ft.to_dict(),
        "linearize": lin_opts,
        "losses": {s.name: s.losses for s in result.stages},
    }


def main() -> None:
    args = parse_args()
    base, tokenizer = start(args, report)
    from linconv.data import load_text, tokenize

    texts = {"plays": load_text(None, "heldout"), "britannica": load_text(None, "britannica"), "third": third_text(args.third_text)}
    ids = {name: tokenize(tokenizer, text) for name, text in texts.items()}
    run_pending(
        args.out,
        args.only,
        RUNS,
        lambda: {"perplexity": perplexities(base, ids), "text_tokens": {n: len(t) for n, t in ids.items()}},
        lambda name: run_one(name, base, tokenizer, ids, args),
        lambda rec: "  ".join(f"{t} {rec['perplexity'][t]:.2f}" for t in TEXTS) + f"  {rec['cpu_minutes']:.1f} CPU-min",
    )
    report(args.out)


def report(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    records = read_records(out)
    orig = records.pop("original", None)
    if orig is None:
        raise SystemExit(f"no original.json in {out}")
    base = orig["perplexity"]
    head = ["run", "what", *(f"{t} (÷ orig)" for t in TEXTS), "tokens", "minutes", "CPU-min", "own text min"]
    table = Table(title="perplexity after fine-tuning, default model (16K tokens per text)")
    for col in head:
        table.add_column(col, justify="left" if col in ("run", "what") else "right")
    md = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    rows = [["original", "softmax (SmolLM2-135M-Instruct)", *(f"{base[t]:.2f}" for t in TEXTS), "", "", "", ""]]
    for name in [n for n in RUNS if n in records]:
        r = records[name]
        cells = [f"{r['perplexity'][t]:.2f} ({r['perplexity'][t] / base[t]:.2f}×)" for t in TEXTS]
        own = f"{r['selfgen_minutes']:.1f}" if r["selfgen_minutes"] else ""
        rows.append([name, r["what"], *cells, f"{r['tokens']:,}", f"{r['wall_minutes']:.1f}", f"{r['cpu_minutes']:.1f}", own])
    for cells in rows:
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    (out / "results.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
