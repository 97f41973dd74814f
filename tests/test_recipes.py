"""linconv.recipes: a recipe's options, overridden by the options given explicitly, never clashing."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny
from typer.testing import CliRunner

from linconv.cli import app
from linconv.config import LinearizeConfig
from linconv.finetune import FinetuneConfig
from linconv.recipes import RECIPES, Recipe

CLASHING = Recipe(
    "clash",
    "sets fields that the CLI also passes",
    convert={"group_size": 32, "seed": 3, "keep_softmax_layers": [0], "conv_kernel": 2},
    finetune={"lr": 0.5, "seq_len": 64, "seed": 4, "text": "recipe.txt"},
)


def test_an_option_given_explicitly_overrides_the_recipe_without_clashing():
    cfg = CLASHING.linearize_config(group_size=8, seed=5, keep_softmax_layers=None, attention=None)
    assert (cfg.group_size, cfg.seed, cfg.keep_softmax_layers, cfg.conv_kernel) == (8, 5, [0], 2)
    assert cfg.attention == LinearizeConfig().attention  # neither given nor in the recipe: the default
    ft = CLASHING.finetune_config(lr=0.1, seed=7, text=None, medusa_heads=2)
    assert (ft.lr, ft.seq_len, ft.seed, ft.text, ft.medusa_heads) == (0.1, 64, 7, "recipe.txt", 2)
    assert isinstance(ft, FinetuneConfig) and ft.lora_rank == FinetuneConfig().lora_rank


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_builds_valid_configs(name):
    RECIPES[name].linearize_config().validate()
    RECIPES[name].finetune_config().validate()


def test_convert_command_lets_explicit_options_win_over_any_recipe_field(tmp_path, monkeypatch):
    monkeypatch.setitem(RECIPES, "clash", CLASHING)
    save_tiny("llama", tmp_path / "src")
    args = ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--recipe", "clash", "--seed", "5", "--keep-softmax-layers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["linconv"]
    assert (cfg["seed"], cfg["keep_softmax_layers"], cfg["group_size"], cfg["conv_kernel"]) == (5, [1], 32, 2)
