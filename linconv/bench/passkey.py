"""``passkey``: retrieve a 5-digit number hidden at some depth of a long filler text.

The prompt is the one of Landmark Attention / LongLoRA / LoLCATs: an instruction, a repeated filler
sentence, the needle ``The pass key is 71432. Remember it. 71432 is the pass key.`` at a depth (0: right
after the instruction, 1: right before the question) and ``What is the pass key? The pass key is``. The
model decodes greedily through linconv's engine; a trial is right when the first number it writes is
the key. Exact recall from far back is linear attention's known weakness (LoLCATs-style models score
near 0%), so this grid shows honestly how much of it a conversion keeps.

Prompts are built in token space (each piece encoded once, the filler repeated), so a prompt of a
nominal length L has between L − (one filler sentence) and L tokens; both models get the same prompts
and keys, drawn from a seeded generator.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from linconv.bench.base import ROLES, BenchInputs
from linconv.errors import LinconvError
from linconv.generate import generate
from linconv.progress import SILENT, Progress

if TYPE_CHECKING:  # run.py imports this module through the task registry
    from linconv.bench.run import BenchSettings

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
NEW_TOKENS = 10  # enough for " 71432." with one token per digit


@dataclass
class PasskeySettings:
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # nominal prompt lengths in tokens
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the needle sits, 0 = start, 1 = end
    trials: int = 2  # keys per (length, depth) cell
    chunk: int = 2048  # prefill tokens per forward
    seed: int = 0


@dataclass
class Cell:
    length: int  # nominal prompt length
    depth: float
    prompt_tokens: int  # actual tokens of the prompts (the same for every trial of the cell)
    correct: dict[str, int] = field(default_factory=dict)  # role -> trials answered right
    answers: dict[str, list[str]] = field(default_factory=dict)  # role -> the generated text per trial


@dataclass
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    trials: int
    cells: list[Cell] = field(default_factory=list)

    def accuracy(self, role: str) -> list[list[float]] | None:
        """[length][depth] fraction of trials right, or None when ``role`` did not run."""
        if not self.cells or role not in self.cells[0].correct:
            return None
        grid = {(c.length, c.depth): c.correct[role] / self.trials for c in self.cells}
        return [[grid[(n, d)] for d in self.depths] for n in self.lengths]

    def overall(self, role: str) -> float | None:
        grid = self.accuracy(role)
        return None if grid is None else sum(map(sum, grid)) / (len(self.lengths) * len(self.depths))


def passkey_json(result: PasskeyResult, s: BenchSettings | None = None) -> dict:
    """The bench JSON's ``passkey`` part (:data:`SCHEMA`); the result holds every setting it needs."""
    return {
        "lengths": list(result.lengths),
        "depths": list(result.depths),
        "trials": result.trials,
        **{r: None if result.accuracy(r) is None else {"accuracy": result.accuracy(r), "overall": result.overall(r)} for r in ROLES},
        "cells": [
            {"length": c.length, "depth": c.depth, "prompt_tokens": c.prompt_tokens, "correct": {r: c.correct.get(r) for r in ROLES}}
            for c in result.cells
        ],
    }


_GRID = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
_ROLE = {"type": ["object", "null"], "required": ["accuracy", "overall"], "properties": {"accuracy": _GRID, "overall": {"type": "number"}}}
# The JSON of passkey_json (JSON Schema); the bench JSON's "passkey" key.
SCHEMA = {
    "type": "object",
    "required": ["lengths", "depths", "trials", *ROLES, "cells"],
    "properties": {
        "lengths": {"type": "array", "items": {"type": "integer"}},
        "depths": {"type": "array", "items": {"type": "number"}},
        "trials": {"type": "integer"},
        "cells": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["length", "depth", "prompt_tokens", "correct"],
                "properties": {
                    "length": {"type": "integer"},
                    "depth": {"type": "number"},
                    "prompt_tokens": {"type": "integer"},
                    "correct": {"type": "object", "required": list(ROLES), "additionalProperties": {"type": ["integer", "null"]}},
                },
            },
        },
    }
    | dict.fromkeys(ROLES, _ROLE),
}


def parse_lengths(text: str | tuple[int, ...]) -> tuple[int, ...]:
    """``"1024,4K,16k"`` -> (1024, 4096, 16384): token counts, K meaning 1024."""
    parts = text.split(",") if isinstance(text, str) else [str(x) for x in text]
    try:
        values = [int(p.strip()[:-1]) * 1024 if p.strip().lower().endswith("k") else int(p) for p in parts if p.strip()]
    except ValueError:
        raise LinconvError(f"--passkey-lengths takes comma-separated token counts (e.g. 1024,4K), got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise LinconvError(f"--passkey-lengths needs positive token counts, got {text!r}")
    return tuple(sorted(set(values)))


def parse_depths(text: str | tuple[float, ...]) -> tuple[float, ...]:
    """``"0,0.5,1"`` -> (0.0, 0.5, 1.0): fractions of the filler before the needle."""
    parts = text.split(",") if isinstance(text, str) else [str(x) for x in text]
    try:
        values = [float(p) for p in parts if p.strip()]
    except ValueError:
        raise LinconvError(f"--passkey-depths takes comma-separated fractions in [0, 1], got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise LinconvError(f"--passkey-depths needs fractions in [0, 1], got {text!r}")
    return tuple(sorted(set(values)))


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of a prompt of at most ``length`` tokens with ``key`` at ``depth`` of the filler."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    intro, filler, needle, question = enc(INTRO), enc(FILLER), enc(NEEDLE.format(key=key)), enc(QUESTION)
    units = (length - len(intro) - len(needle) - len(question)) // len(filler)
    if units < 1:
        shortest = len(intro) + len(needle) + len(question) + len(filler)
        raise LinconvError(f"a passkey prompt needs at least {shortest} tokens with this tokenizer, got a length of {length}")
    before = round(depth * units)
    return intro + filler * before + needle + filler * (units - before) + question


def passkey_correct(text: str, key: str) -> bool:
    """Whether the first number in the model's answer ``text`` is ``key``."""
    found = re.search(r"\d+", text)
    return found is not None and found.group() == key


def passkey(models: dict[str, tuple[nn.Module, object]], settings: PasskeySettings, progress: Progress = SILENT) -> PasskeyResult:
    """The passkey grid for every model in ``models`` (role -> (model, tokenizer)); greedy decoding."""
    if settings.trials <= 0:
        raise LinconvError(f"--passkey-trials must be > 0, got {settings.trials}")
    rng = random.Random(settings.seed)
    grid = [(n, d, [str(rng.randrange(10000, 100000)) for _ in range(settings.trials)]) for n in settings.lengths for d in settings.depths]
    result = PasskeyResult(list(settings.lengths), list(settings.depths), settings.trials)
    tokenizer = next(iter(models.values()))[1]
    prompts = [[passkey_prompt(tokenizer, n, d, k) for k in keys] for n, d, keys in grid]  # raises before any model runs
    for (n, d, _), rows in zip(grid, prompts):
        result.cells.append(Cell(n, d, max(map(len, rows))))
    for role, (model, tok) in models.items():
        label = f"passkey · {role}"
        progress.start(label, len(grid))
        for i, ((n, d, keys), rows, cell) in enumerate(zip(grid, prompts, result.cells)):
            out = generate(
                model,
                rows,
                max_new_tokens=NEW_TOKENS,
                stop_token_ids=(),
                prefill_chunk=settings.chunk,
                tokenizer=tok,
                ignore_context_limit=True,
            )
            cell.answers[role] = out.texts
            cell.correct[role] = sum(passkey_correct(text, key) for text, key in zip(out.texts, keys))
            progress.update(label, i + 1, len(grid), length=n, depth=d)
        progress.end(label)
    return result


# --- the ``passkey`` bench task -------------------------------------------------------------------


def run_passkey(inputs: BenchInputs, s: BenchSettings, progress: Progress) -> PasskeyResult:
    """Every model on the same prompts and keys."""
    settings = PasskeySettings(s.passkey_lengths, s.passkey_depths, s.passkey_trials, s.prefill_chunk)
    return passkey(inputs.with_tokenizer(), settings, progress)
