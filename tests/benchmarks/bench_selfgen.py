"""How long the self-generated training text takes: the default model (SmolLM2-135M-Instruct, fp32)
writes ``--tokens`` text tokens through ``linconv.selfgen`` (run by hand; pytest ignores this folder).

On a CPU shared with other jobs use ``--threads 1``: measured with ~10 busy processes on 2
cores, a batch-16 decode step took 0.28 s with one thread and 2.2 s with two (spin-waiting threads).

The cache goes to a fresh temporary folder unless ``--cache`` is given, so the text is really
generated. Prints a card (time, tokens/s, documents, answers that ended by themselves, one sample)
on stderr, then one JSON object as the last line. Run:

    python tests/benchmarks/bench_selfgen.py [--tokens 20000] [--batch-size 32] [--max-new-tokens 256]
        [--threads 2] [--cache DIR] [--model SOURCE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from linconv.models import ADAPTERS
from linconv.selfgen import SelfGenConfig, self_generated_text
from linconv.sources import load_source


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="source model (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_source(args.model, ADAPTERS)
    load_s = time.perf_counter() - t0
    cfg = SelfGenConfig(tokens=args.tokens, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = self_generated_text(model, tokenizer, cfg, cache=args.cache or tmp)
        wall = time.perf_counter() - t0
    result = {
        "tokens": out.tokens,
        "generated_tokens": out.generated_tokens,
        "documents": out.documents,
        "ended_by_themselves": out.ended,
        "generate_s": round(out.seconds, 1),
        "wall_s": round(wall, 1),
        "generated_tokens_per_s": round(out.generated_tokens / out.seconds, 1),
        "load_s": round(load_s, 1),
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "threads": args.threads,
        "chat_template": bool(tokenizer.chat_template),
    }
    print(f"{out.tokens} text tokens ({out.generated_tokens} sampled) in {out.documents} documents, "
          f"{out.seconds:.0f} s generating ({result['generated_tokens_per_s']} tok/s, batch {cfg.batch_size}, "
          f"{args.threads} threads); {out.ended} answers ended by themselves", file=sys.stderr)  # fmt: skip
    print("--- a sample ---\n" + out.text[:1200] + "\n---", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
