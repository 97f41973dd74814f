"""``next_line``: a multiple-choice task built offline from the held-out plays.

Each item shows a few lines of a play and asks which of four lines comes next: the true line, or one
of three lines of similar length drawn from far away in the held-out text. A model that follows the
sentence and the verse picks the true line; one that does not is at chance (25%). It needs no network
and no dataset download, so ``bench --tasks downstream`` gives a real signal on any machine, and it
exercises the lm-evaluation-harness path offline (:func:`write_lm_eval_task`).

Scoring is lm-evaluation-harness's multiple-choice rule, which :func:`score_items` reproduces without
it: the log-likelihood of ``"\\n" + choice`` after the context (tokens of ``context + continuation``
past those of ``context``); ``acc`` takes the highest sum, ``acc_norm`` the highest sum per character
of the choice.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from linconv.errors import LinconvError
from linconv.loss import model_parts

TASK_NAME = "next_line"
DELIMITER = "\n"  # between the context and a choice (lm-eval's target_delimiter)
MIN_CHARS = 25  # a line shorter than this (a speaker's name, "No more.") is never a target or distractor
LENGTH_SLACK = 0.25  # distractors are within ±25% of the true line's length: length gives nothing away
MIN_DISTANCE = 200  # lines between a target and its distractors


@dataclass(frozen=True)
class Item:
    context: str  # the lines before the target, ending without a newline
    choices: tuple[str, ...]
    label: int  # index of the true next line in ``choices``


@dataclass
class ChoiceScore:
    acc: float  # fraction of items whose highest log-likelihood choice is the true one
    acc_norm: float  # the same with log-likelihood per character of the choice
    items: int


def _candidates(lines: list[str]) -> list[int]:
    """Indices of lines that may be a target or a distractor: long enough, not a stage direction,
    and (for a target) preceded by a line of text, so the context ends inside the dialogue."""
    return [
        i
        for i, line in enumerate(lines)
        if i > 0 and len(line.strip()) >= MIN_CHARS and not line.lstrip().startswith("[") and lines[i - 1].strip()
    ]


def next_line_items(text: str, n: int = 400, *, context_lines: int = 6, choices: int = 4, seed: int = 0) -> list[Item]:
    """``n`` items spread evenly over ``text``; the same text and seed always give the same items."""
    if n <= 0 or choices < 2 or context_lines <= 0:
        raise LinconvError(f"next_line needs n > 0, choices >= 2 and context lines > 0, got {n}, {choices}, {context_lines}")
    lines = text.splitlines()
    pool = _candidates(lines)
    by_length = sorted(pool, key=lambda i: len(lines[i].strip()))
    lengths = [len(lines[i].strip()) for i in by_length]
    rng = random.Random(seed)
    targets = [pool[int(k * len(pool) / n)] for k in range(n)] if len(pool) >= n else []
    if not targets:
        raise LinconvError(f"the text has {len(pool)} usable lines, too few for {n} next-line items")
    items = []
    for i in targets:
        true = lines[i].strip()
        lo, hi = _span(lengths, len(true) * (1 - LENGTH_SLACK), len(true) * (1 + LENGTH_SLACK))
        near = [j for j in by_length[lo:hi] if abs(j - i) >= MIN_DISTANCE and lines[j].strip() != true]
        if len({lines[j].strip() for j in near}) < choices - 1:
            continue
        picked: list[str] = []
        while len(picked) < choices - 1:
            other = lines[rng.choice(near)].strip()
            if other not in picked:
                picked.append(other)
        label = rng.randrange(choices)
        context = "\n".join(lines[max(0, i - context_lines) : i]).strip("\n")
        items.append(Item(context, (*picked[:label], true, *picked[label:]), label))
    return items


def _span(sorted_values: list[int], lo: float, hi: float) -> tuple[int, int]:
    """Index range of ``sorted_values`` within [lo, hi]."""
    return bisect.bisect_left(sorted_values, lo), bisect.bisect_right(sorted_values, hi)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: trailing spaces of the
    context move to the continuation, and the continuation is what the whole adds after the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    head = tokenizer.encode(context)
    return head, whole[len(head) :]


@torch.inference_mode()
def choice_loglikelihoods(model: nn.Module, tokenizer, item: Item) -> list[float]:
    """Σ log p(continuation token) for ``DELIMITER + choice`` after the item's context, per choice.

    The choices run as one right-padded batch: a causal model's scores at a position never depend on
    later positions, so the padding changes nothing that is scored.
    """
    pairs = [encode_pair(tokenizer, item.context, DELIMITER + c) for c in item.choices]
    rows = [head + cont for head, cont in pairs]
    width = max(map(len, rows))
    device = next(model.parameters()).device
    ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=device)
    decoder, lm_head = model_parts(model)
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [choices, width, d]
    out = []
    for b, (head, cont) in enumerate(pairs):
        if not head or not cont:
            raise LinconvError(f"next_line: a context or a choice encodes to no tokens ({item.context[-30:]!r})")
        positions = torch.arange(len(head) - 1, len(head) + len(cont) - 1, device=device)
        logp = lm_head(hidden[b, positions]).float().log_softmax(-1)  # [len(cont), V]
        out.append(logp.gather(-1, torch.tensor(cont, device=device)[:, None]).sum().item())
    return out


def score_items(model: nn.Module, tokenizer, items: list[Item], progress: Callable[[int, int], None] | None = None) -> ChoiceScore:
    """Accuracy of ``model`` on ``items`` by log-likelihood (lm-evaluation-harness's acc and acc_norm)."""
    right = right_norm = 0
    for k, item in enumerate(items):
        lls = choice_loglikelihoods(model, tokenizer, item)
        norm = [ll / len(c) for ll, c in zip(lls, item.choices)]
        right += lls.index(max(lls)) == item.label
        right_norm += norm.index(max(norm)) == item.label
        if progress is not None:
            progress(k + 1, len(items))
    return ChoiceScore(right / len(items), right_norm / len(items), len(items))


def write_lm_eval_task(items: list[Item], folder: str | Path) -> Path:
    """Write ``items`` as an lm-evaluation-harness task folder (a JSONL file and its YAML) usable as an
    ``include_path``; the ``json`` dataset loader reads the file offline. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK_NAME}.jsonl"
    data.write_text("".join(json.dumps(asdict(it)) + "\n" for it in items), encoding="utf-8")
    config = {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # column names of the JSONL rows
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": DELIMITER,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }
    # JSON is valid YAML, and needs no YAML library here.
    (folder / f"{TASK_NAME}.yaml").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder
