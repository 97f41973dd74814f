"""linconv.checkpoint and the load/convert helpers: telling linconv folders apart, the conversion
card, the default source recorded and read back."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from conftest import save_tiny

import linconv.sources
from linconv.checkpoint import linconv_config, save_checkpoint
from linconv.config import LinearizeConfig
from linconv.convert import conversion_card, load_and_convert, load_or_convert
from linconv.models import ADAPTERS
from linconv.models.hf import is_linconv
from linconv.sources import DEFAULT_SOURCE, load_source
from linconv.version import __version__


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A plain tiny llama folder and its conversion, saved with its card."""
    root = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", root / "plain")
    model, tokenizer, _ = load_and_convert(root / "plain", LinearizeConfig(group_size=8))
    save_checkpoint(model, tokenizer, root / "lin", card=conversion_card(model, "paper"))
    return root


def test_linconv_config_tells_checkpoints_from_other_folders(folders, tmp_path):
    config = linconv_config(folders / "lin")
    assert config is not None and config["model_type"] == "linconv-llama" and is_linconv(config)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("[not json")
    for other in (folders / "plain", tmp_path / "missing", tmp_path / "garbage"):
        assert linconv_config(other) is None
    assert not is_linconv({"model_type": None}) and not is_linconv(json.loads((folders / "plain" / "config.json").read_text()))


def test_conversion_card_records_what_made_it_the_source_recipe_and_options(folders):
    card = json.loads((folders / "lin" / "linconv.json").read_text())
    assert card["made_by"] == f"linconv {__version__} convert" and datetime.fromisoformat(card["date"])
    assert card["source"] == str(folders / "plain") and card["recipe"] == "paper"
    assert card["group_size"] == 8 and card["attention"] == LinearizeConfig().attention
    assert "- **recipe**: `paper`" in (folders / "lin" / "README.md").read_text()


def test_load_or_convert_loads_a_checkpoint_or_converts_the_default_model(folders, monkeypatch):
    model, tokenizer, original = load_or_convert(folders / "lin")
    assert is_linconv(model.config) and tokenizer is not None and original is None
    monkeypatch.setattr(linconv.sources, "default_model_path", lambda: folders / "plain")
    model, tokenizer, original = load_or_convert(None)
    assert is_linconv(model.config) and model.config.linconv["source"] == DEFAULT_SOURCE
    assert original.config.model_type == "llama" and tokenizer is not None


def test_the_recorded_default_source_loads_the_default_model(folders, monkeypatch):
    monkeypatch.setattr(linconv.sources, "default_model_path", lambda: folders / "plain")
    model, _ = load_source(DEFAULT_SOURCE, ADAPTERS)
    assert model.config.model_type == "llama"
