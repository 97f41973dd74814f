"""bf16 stability: greedy agreement of each model in bf16 with itself in fp32 (run by hand; pytest
ignores this folder).

For the original default model (SmolLM2-135M-Instruct) and a fresh conversion of it (default recipe),
or ``--checkpoint``, a linconv checkpoint of it (e.g. fine-tuned: the model users run; in bf16 its
weights are bf16 and its decoding state stays fp32), on the held-out plays:

1. prefill: ``--tokens`` tokens (default 4096) through the cache in chunks of ``--chunk`` (default
   512), keeping every position's logits; per chunk, the share of positions where the bf16 model's
   argmax equals the fp32 model's;
2. decode: ``--steps`` tokens (default 64) greedily decoded by the fp32 model after that prefill, fed
   to both (teacher forcing); the share of steps where the argmaxes agree.

Target (issue 12): the linearized model's agreement no worse than the original's own. Prints a table,
then one JSON object as the last line. Run:

    python tests/benchmarks/bench_bf16.py [--checkpoint DIR] [--tokens 4096] [--chunk 512] [--steps 64] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
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


@torch.inference_mode()
def argmaxes(model, ids: torch.Tensor, chunk: int, steps: int, follow: list[int] | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """The argmax at every prompt position (one tensor per prefill chunk), then the argmax after the
    prompt and after each of ``steps`` more tokens: the model's own greedy tokens, or ``follow``."""
    cache = new_cache(model)
    chunks = []
    for s in range(0, ids.shape[1], chunk):
        chunks.append(model(ids[:, s : s + chunk], cache=cache, use_cache=True).logits[0].float().argmax(-1))
    after = [int(chunks[-1][-1])]
    for i in range(steps):
        feed = after[-1] if follow is None else follow[i]
        after.append(int(model(torch.tensor([[feed]]), cache=cache, use_cache=True).logits[0, -1].float().argmax()))
    return chunks, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="a linconv checkpoint of the default model (default: convert it now)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    original, tokenizer = load_source(None, ADAPTERS, dtype=torch.float32, device=torch.device("cpu"))
    linear = linconv.convert(original) if args.checkpoint is None else linconv.load(args.checkpoint, dtype=torch.float32)[0]
    ids = tokenize(tokenizer, load_text(None, "heldout"))[: args.tokens][None]
    results = {}
    for name, model in (("original", original), ("linearized", linear)):
        err.print(f"[dim]{name}: fp32…[/]")
        want_chunks, want_steps = argmaxes(model, ids, args.chunk, args.steps)
        err.print(f"[dim]{name}: bf16…[/]")
        got_chunks, got_steps = argmaxes(copy.deepcopy(model).to(torch.bfloat16), ids, args.chunk, args.steps, follow=want_steps)
        per_chunk = [float((a == b).float().mean()) for a, b in zip(got_chunks, want_chunks)]
        results[name] = {
            "prefill_agreement_by_chunk": per_chunk,
            "prefill_agreement": sum(per_chunk) / len(per_chunk),
            "decode_agreement": sum(a == b for a, b in zip(got_steps[1:], want_steps[1:])) / args.steps,
        }
    table = Table(title=f"bf16 vs fp32 greedy agreement ({ids.shape[1]} prompt tokens in chunks of {args.chunk}, {args.steps} steps)")
    for col in ("model", "prefill", "first chunk", "last chunk", "decode"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        chunks = r["prefill_agreement_by_chunk"]
        table.add_row(name, *(f"{100 * x:.1f}%" for x in (r["prefill_agreement"], chunks[0], chunks[-1], r["decode_agreement"])))
    Console().print(table)
    lin, orig = results["linearized"], results["original"]
    results["no_worse_than_original"] = (
        lin["prefill_agreement"] >= orig["prefill_agreement"] and lin["decode_agreement"] >= orig["decode_agreement"]
    )
    print(
        json.dumps(
            {
                "checkpoint": args.checkpoint,
                "tokens": int(ids.shape[1]),
                "chunk": args.chunk,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
