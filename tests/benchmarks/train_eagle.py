"""Train an EAGLE draft head for a checkpoint, shape its tree by measurement, save both beside it
(run by hand; pytest ignores this folder). ``linconv finetune CKPT OUT --draft-head eagle`` does the
same as a fine-tuning stage (``linconv.finetune.stages.Eagle``), writing OUTPUT instead of CKPT.

1. Self-distillation: the checkpoint continues ``--prompts`` windows of the built-in training plays
   greedily (``--new-tokens`` each); ``--steps`` AdamW steps train the head on its features
   (``linconv.speculative.eagle_train``).
2. Tree shape: the head guesses along the target's own continuations of ``--shape-prompts`` held-out
   windows (Britannica, which bench does not use for prompts) to ``--depth`` levels; with the verify
   and draft costs timed on this device, the static tree with the most tokens/s
   (``linconv.speculative.shape``).
3. Saves ``eagle.safetensors`` + ``eagle.json`` into the checkpoint folder right after training, and
   the tree into ``eagle.json`` after shaping, unless ``--no-save``. Then ``linconv generate CKPT --spec-decode --draft eagle`` and
   ``linconv bench CKPT --spec-decode`` use it.

Prints progress on stderr, a card, then one JSON object as the last line. Run:

    python tests/benchmarks/train_eagle.py CHECKPOINT [--prompts 64] [--new-tokens 192] [--steps 300]
        [--batch-size 4] [--lr 1e-3] [--shape-prompts 8] [--depth 6] [--threads N] [--no-save]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch

from linconv.checkpoint import load
from linconv.cli.progress import RichProgress
from linconv.speculative.eagle import EAGLE_CONFIG, EagleDraft, save_eagle
from linconv.speculative.eagle_train import EagleTrainConfig, train_eagle
from linconv.speculative.files import store_tree
from linconv.speculative.shape import shape_tree, spread_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    defaults = EagleTrainConfig()
    for name in ("prompts", "prompt_tokens", "new_tokens", "steps", "batch_size", "candidates"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "ce_weight", "noise"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--shape-prompts", type=int, default=8)
    parser.add_argument("--shape-tokens", type=int, default=64, help="continuation tokens per shape prompt")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.checkpoint)
    cfg = EagleTrainConfig(**{k: getattr(args, k) for k in asdict(defaults) if hasattr(args, k)})
    with RichProgress() as progress:
        result = train_eagle(model, tokenizer, cfg, progress=progress)
        if not args.no_save:  # saved before the (slow) shaping, so that an interrupted run keeps the head
            save_eagle(result.head, args.checkpoint, extra={"training": asdict(cfg)})
        start = time.perf_counter()
        prompts = spread_windows(tokenizer, None, "britannica", args.shape_prompts, 64)
        shape = shape_tree(model, EagleDraft(result.head), prompts, new_tokens=args.shape_tokens, depth=args.depth)
        shape_s = time.perf_counter() - start
    size = sum(t.numel() * t.element_size() for t in result.head.state_dict().values())
    if not args.no_save:
        store_tree(args.checkpoint, EAGLE_CONFIG, shape.to_dict())
    card = {
        "checkpoint": args.checkpoint,
        "params": result.params,
        "bytes": size,
        "distill_s": round(result.distill_s, 1),
        "train_s": round(result.train_s, 1),
        "shape_s": round(shape_s, 1),
        "tokens": result.tokens,
        "loss_first_last": [round(result.losses[0], 4), round(result.losses[-1], 4)],
        "train_top1": round(result.accuracy, 4),
        "tree": shape.to_dict(),
        "saved": not args.no_save,
    }
    for key, value in card.items():
        if key != "tree":
            print(f"{key:>16}: {value}")
    print(f"{'tree widths':>16}: {shape.widths} ({shape.nodes} nodes), {shape.expected_tokens:.2f} tokens/step expected")
    print(
        f"{'acceptance':>16}: "
        + " ".join(f"{a:.0%}" for a in shape.acceptance)
        + "  (top-1 by depth: "
        + " ".join(f"{a:.0%}" for a in shape.top1)
        + ")"
    )
    print(f"{'tokens/s':>16}: {shape.tokens_per_s:.1f} expected vs {shape.plain_tokens_per_s:.1f} plain (verify of one node)")
    print(json.dumps(card))


if __name__ == "__main__":
    main()
