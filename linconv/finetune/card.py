"""The model card (``linconv.json`` and README) of a fine-tuned checkpoint: the input's card plus this run.

Fine-tuning a fine-tuned checkpoint keeps the earlier runs under ``earlier_finetunes``.
"""

from __future__ import annotations

import json
from contextlib import suppress
from pathlib import Path

from linconv.checkpoint import made_by
from linconv.finetune.config import FinetuneConfig, StageResult


def read_card(checkpoint: Path) -> dict:
    """The card of the input checkpoint ({} when it has none or it cannot be read)."""
    card_file = checkpoint / "linconv.json"
    if card_file.is_file():
        with suppress(OSError, ValueError):
            return json.loads(card_file.read_text())
    return {}


def finetune_card(
    previous: dict,
    *,
    checkpoint: Path,
    cfg: FinetuneConfig,
    processes: int,
    results: list[StageResult],
    evals: list[dict],
    replaced: tuple[str, ...],
    entries: dict,
) -> dict:
    """The card of the output: ``previous`` (the input's) without its run-specific keys and ``replaced``
    (keys the stages write), then this run's settings, final losses and evaluations, then ``entries``."""
    card = {k: v for k, v in previous.items() if k not in ("made_by", "date", *replaced)}
    if "finetune" in card:  # fine-tuning a fine-tuned checkpoint: keep the earlier runs
        earlier = {"finetuned_from": card.pop("finetuned_from", None), **card.pop("finetune")}
        if "heldout_perplexity" in card:
            earlier["heldout_perplexity"] = card.pop("heldout_perplexity")
        card["earlier_finetunes"] = [*card.get("earlier_finetunes", []), earlier]
    card.update(
        {
            **made_by("finetune"),
            "finetuned_from": str(checkpoint),
            "finetune": {
                **cfg.to_dict(),
                "processes": processes,
                "final_loss": {r.name: r.losses[-1] for r in results if r.losses},
            },
        }
    )
    if evals:
        card["heldout_perplexity"] = [f"{e['stage']}@{e['step']}: {e['perplexity']:.3f}" for e in evals]
    card.update(entries)
    return card
