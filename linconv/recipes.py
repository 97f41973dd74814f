"""Named presets of conversion and fine-tuning options (``--recipe``), one explicit dict.

A recipe only lists what differs from the defaults of :class:`~linconv.config.LinearizeConfig` and
:class:`~linconv.finetune.FinetuneConfig`, which *are* the default recipe: the best one measured on
the default model (``tests/benchmarks/compare_variants.py``, README "Which variant"). Options given
explicitly (on the command line) override the recipe's: build a config with
:meth:`Recipe.linearize_config` / :meth:`Recipe.finetune_config`, passing None for an option not given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from linconv.config import LinearizeConfig
from linconv.errors import LinconvError
from linconv.finetune import FinetuneConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    convert: dict = field(default_factory=dict)  # LinearizeConfig fields
    finetune: dict = field(default_factory=dict)  # FinetuneConfig fields

    def options(self, stage: str, given: dict) -> dict:
        """This recipe's options for ``stage`` ("convert" or "finetune"), overridden by the non-None ``given``."""
        return {**getattr(self, stage), **{k: v for k, v in given.items() if v is not None}}

    def linearize_config(self, **given) -> LinearizeConfig:
        """The conversion options: this recipe's, each overridden by a non-None ``given`` (not validated)."""
        return LinearizeConfig(**self.options("convert", given))

    def finetune_config(self, **given) -> FinetuneConfig:
        """The fine-tuning options: this recipe's, each overridden by a non-None ``given`` (not validated)."""
        return FinetuneConfig(**self.options("finetune", given))


DEFAULT_RECIPE = "linconv"

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            DEFAULT_RECIPE, "best measured: augmented-softmax (in-group softmax, hedgehog global, DWConv), the first group kept as sinks"
        ),
        Recipe(
            "hybrid",
            "linconv with every 5th layer kept softmax: exact recall for speculative decoding "
            "on input-grounded text; those layers keep a KV cache (1/5 of the original's)",
            convert={"softmax_every": 5},
        ),
        Recipe(
            "paper",
            "the paper's exact form: augmented (in-group relu², relu global, 32-tap DWConv), groups of 64, no sinks",
            convert={"attention": "augmented", "group_size": 64, "sinks": 0},
        ),
    ]
}


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``; an unknown name is an error that lists the choices."""
    try:
        return RECIPES[name]
    except KeyError:
        raise LinconvError(f"unknown recipe {name!r}; choose from: {', '.join(RECIPES)}") from None


def recipe_help() -> str:
    return "Preset options: " + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()) + ". Explicit options override it."
