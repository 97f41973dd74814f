"""bf16 stability: greedy agreement of each model in bf16 with itself in fp32 (run by hand; pytest
ignores this folder).

For the original default model (SmolLM2-135M-Instruct) and a fresh conversion of it (default recipe),
or ``--checkpoint``, a linconv checkpoint of it (e.g. fine-tuned: the model users run; in bf16 its
weights are bf16 and its decoding state stays fp32), on ``--segments`` consecutive stretches of the
held-out plays (default 1), each read from a fresh state:

1. prefill: ``--tokens`` tokens (default 4096) through the cache in chunks of ``--chunk`` (default
   512), keeping every position's logits; per chunk, the share of positions where the bf16 model's
   argmax equals the fp32 model's;
2. decode: ``--steps`` tokens (default 64) greedily decoded by the fp32 model after that prefill, fed
   to both (teacher forcing); the share of steps where the argmaxes agree.

Agreement depends on how decided the fp32 model is: where its two best logits are close, any rounding
flips the argmax. So the prefill positions are also binned by the fp32 model's top-2 logit gap, with
the agreement per bin, and the linearized model's agreement is re-weighted to the original's gaps
("at the original's margins"): bf16 arithmetic as stable as the original's gives the original's figure
there, whatever the two models' confidence.

Shares are pooled over the segments (per chunk: the chunk's position in its segment). One segment of
4,096 positions measures a share of ~97% to about ±0.3 points (one standard error); more segments
narrow it.

Target (issue 12): the linearized model's agreement no worse than the original's own. Prints a table,
then one JSON object as the last line. Run:

    python tests/benchmarks/bench_bf16.py [--checkpoint DIR] [--tokens 4096] [--segments 1] [--chunk 512] [--steps 64] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json

import torch
from rich.console import Console
from rich.table import Table

import linconv
from linconv.attention.state import new_cache
from linconv.data import load_text, tokenize
from linconv.models import ADAPTERS
from linconv.sources import load_source

err = Console(stderr=True)
MARGIN_EDGES = (0.0, 0.25, 0.5, 1.0, 2.0, float("inf"))  # fp32 top-2 logit gap bins


def top2(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax [...] (greedy decoding's choice: the first of tied maxima) and the gap between the two
    best logits [...] of logits [..., V] (0 where the two best tie, as bf16 logits often do)."""
    logits = logits.float()
    v = logits.topk(2, dim=-1).values
    return logits.argmax(-1), v[..., 0] - v[..., 1]


@torch.inference_mode()
def argmaxes(model, ids: torch.Tensor, chunk: int, steps: int, follow: list[int] | None = None) -> tuple[list[tuple], list[int]]:
    """The argmax and top-2 gap at every prompt position (one pair of tensors per prefill chunk), then
    the argmax after the prompt and after each of ``steps`` more tokens: the model's own greedy
    tokens, or ``follow``."""
    cache = new_cache(model)
    chunks = []
    for s in range(0, ids.shape[1], chunk):
        chunks.append(top2(model(ids[:, s : s + chunk], cache=cache, use_cache=True).logits[0]))
    after = [int(chunks[-1][0][-1])]
    for i in range(steps):
        feed = after[-1] if follow is None else follow[i]
        after.append(int(model(torch.tensor([[feed]]), cache=cache, use_cache=True).logits[0, -1].float().argmax()))
    return chunks, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--segments", type=int, default=1, help="stretches of --tokens tokens, each from a fresh state")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="a linconv checkpoint of the default model (default: convert it now)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    original, tokenizer = load_source(None, ADAPTERS, dtype=torch.float32, device=torch.device("cpu"))
    linear = linconv.convert(original) if args.checkpoint is None else linconv.load(args.checkpoint, dtype=torch.float32)[0]
    text = tokenize(tokenizer, load_text(None, "heldout"))
    if len(text) < args.segments * args.tokens:
        raise SystemExit(f"the held-out text has {len(text):,} tokens, fewer than --segments × --tokens")
    segments = [text[i * args.tokens : (i + 1) * args.tokens][None] for i in range(args.segments)]
    results = {}
    for name, model in (("original", original), ("linearized", linear)):
        low = copy.deepcopy(model).to(torch.bfloat16)
        agree, margins, ties, steps = [], [], [], []  # per segment: per chunk, [positions] agreeing, fp32 gaps, bf16 ties; per step
        for i, ids in enumerate(segments):
            err.print(f"[dim]{name}: segment {i + 1}/{len(segments)}: fp32, then bf16…[/]")
            want_chunks, want_steps = argmaxes(model, ids, args.chunk, args.steps)
            got_chunks, got_steps = argmaxes(low, ids, args.chunk, args.steps, follow=want_steps)
            agree.append([(a == b).float() for (a, _), (b, _) in zip(got_chunks, want_chunks)])
            margins.append(torch.cat([m for _, m in want_chunks]))
            ties.append(torch.cat([m == 0 for _, m in got_chunks]))
            steps += [a == b for a, b in zip(got_steps[1:], want_steps[1:])]
        per_chunk = [float(torch.cat(by_segment).mean()) for by_segment in zip(*agree)]
        every, margin = torch.cat([c for seg in agree for c in seg]), torch.cat(margins)
        bins = [(margin >= lo) & (margin < hi) for lo, hi in itertools.pairwise(MARGIN_EDGES)]
        results[name] = {
            "prefill_agreement_by_chunk": per_chunk,
            "prefill_agreement": float(every.mean()),
            "decode_agreement": sum(steps) / len(steps),
            "bf16_tied_top2": float(torch.cat(ties).float().mean()),
            "margin_bins": [
                {"from": lo, "to": hi, "share": float(b.float().mean()), "agreement": float(every[b].mean()) if b.any() else None}
                for lo, hi, b in zip(MARGIN_EDGES, MARGIN_EDGES[1:], bins)
            ],
        }
    title = f"{args.segments} × {args.tokens} prompt tokens in chunks of {args.chunk}, {args.steps} steps after each"
    table = Table(title=f"bf16 vs fp32 greedy agreement ({title})")
    for col in ("model", "prefill", "first chunk", "last chunk", "decode"):
        table.add_column(col, justify="right")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    for name, r in results.items():
        chunks = r["prefill_agreement_by_chunk"]
        table.add_row(name, *(pct(x) for x in (r["prefill_agreement"], chunks[0], chunks[-1], r["decode_agreement"])))
    Console().print(table)
    lin, orig = results["linearized"], results["original"]
    bins = Table(title="prefill agreement by the fp32 model's top-2 logit gap (share of positions, agreement)")
    for col in ("gap", "original share", "original agreement", "linearized share", "linearized agreement"):
        bins.add_column(col, justify="right")
    for o, li in zip(orig["margin_bins"], lin["margin_bins"]):
        bins.add_row(f"{o['from']:g}–{o['to']:g}", *(pct(x) for x in (o["share"], o["agreement"], li["share"], li["agreement"])))
    Console().print(bins)
    matched = sum(o["share"] * (li["agreement"] or 0) for o, li in zip(orig["margin_bins"], lin["margin_bins"]))
    lin["prefill_agreement_at_original_margins"] = matched
    ties = f"{pct(orig['bf16_tied_top2'])} (original), {pct(lin['bf16_tied_top2'])} (linearized)"
    Console().print(f"bf16 logits with two tied maxima: {ties}")
    Console().print(f"linearized prefill agreement at the original's margins: {pct(matched)} (original {pct(orig['prefill_agreement'])})")
    results["no_worse_than_original"] = (
        lin["prefill_agreement"] >= orig["prefill_agreement"] and lin["decode_agreement"] >= orig["decode_agreement"]
    )
    print(
        json.dumps(
            {
                "checkpoint": args.checkpoint,
                "tokens": args.tokens,
                "segments": args.segments,
                "chunk": args.chunk,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
