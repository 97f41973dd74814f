"""Variants resolved once into per-layer specs: registries, validation, causality, the module's spec."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from conftest import converted

import linconv
from linconv import ops
from linconv.attention.features import FEATURE_MAPS
from linconv.attention.spec import AttentionSpec
from linconv.attention.variants import DEFAULT_VARIANT, VARIANTS
from linconv.errors import LinconvError
from linconv.models import get_adapter
from linconv.recipes import RECIPES

OPTIONS = dict(
    variant="t", conv_taps=0, conv_mask=True, group_size=4, sinks=0, chunk_size=8, seed=0, linformer_rank=4, linformer_max_len=16
)


def test_transnormer_resolves_block_softmax_in_the_lower_half_only():
    specs = linconv.LinearizeConfig(attention="transnormer").specs(5)
    assert [(s.score, s.feature, s.normalize, s.scale_q) for s in specs] == [("softmax", None, True, True)] * 2 + [
        (None, "relu", False, False)
    ] * 3
    assert [s.seed for s in specs] == [0, 1, 2, 3, 4]


def test_specs_take_the_options_and_skip_the_kept_layers():
    cfg = linconv.LinearizeConfig(attention="augmented", group_size=16, keep_softmax_layers=[1], softmax_every=3, seed=2)
    specs = cfg.specs(6)
    assert [i for i, s in enumerate(specs) if s is None] == [1, 2, 5]
    assert {(s.conv_taps, s.group_size, s.score, s.unit_qk) for s in specs if s} == {(32, 16, "relu2", True)}
    assert specs[3].seed == 2003
    assert linconv.LinearizeConfig(attention="relu").specs(1)[0].conv_taps == 0  # the variant's default: no conv


def test_every_converted_layer_holds_its_spec():
    model = converted("llama", "transnormer")
    cfg = model.linconv_config
    attns = [b.self_attn for b in get_adapter("llama").blocks(model)]
    assert [a.spec for a in attns] == cfg.specs(len(attns))
    assert attns[0].feature_map is None and attns[1].out_norm is not None


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(feature="nope"), "unknown feature map 'nope'; choose from: " + ", ".join(FEATURE_MAPS)),
        (dict(score="nope"), "unknown local score 'nope'; choose from: " + ", ".join(ops.SCORES)),
        (dict(), "a layer has a feature map and/or a local score"),
        (dict(feature="relu", linformer=True), "a layer has a feature map and/or a local score"),
    ],
)
def test_a_spec_with_unregistered_or_missing_parts_is_refused(fields, message):
    with pytest.raises(LinconvError, match=re.escape(message)):
        AttentionSpec(**fields, **OPTIONS)


def test_unknown_variant_lists_the_choices():
    with pytest.raises(LinconvError, match=re.escape("unknown attention variant 'nope'; choose from: " + ", ".join(VARIANTS))):
        linconv.LinearizeConfig(attention="nope").specs(2)


@pytest.mark.parametrize(
    "options, leak",
    [
        (dict(attention="linformer"), "variant 'linformer'"),
        (dict(attention="augmented", conv_mask=False), "an unmasked convolution"),
        (dict(attention="augmented", conv_mask=False, conv_kernel=0), None),  # no conv, nothing to leak
        (dict(attention="relu", conv_mask=False), None),  # relu has no conv by default
        (dict(attention="augmented"), None),
    ],
)
def test_causality_is_a_property_of_the_spec(options, leak):
    specs = linconv.LinearizeConfig(allow_noncausal=True, **options).validate().specs(3)
    assert {s.leak for s in specs} == {leak}
    assert all(s.causal == (leak is None) for s in specs)


def test_every_variant_resolves_and_its_flag_matches_its_specs():
    for name, variant in VARIANTS.items():
        specs = linconv.LinearizeConfig(attention=name, conv_kernel=0).specs(4)
        assert all(s.causal == variant.causal for s in specs), name
    assert DEFAULT_VARIANT in VARIANTS


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
def test_every_feature_map_maps_heads_to_features(name):
    phi = FEATURE_MAPS[name](3, 8, 0)
    x = torch.randn(2, 3, 5, 8)
    y = phi(x)
    assert y.shape[:3] == (2, 3, 5) and torch.isfinite(y).all()
    torch.testing.assert_close(phi(x[:, :, 2:3]), y[:, :, 2:3])  # per token: every execution form sees one kernel


def test_the_saved_config_section_keeps_its_fields():
    """config.json's ``linconv`` section is LinearizeConfig's fields: checkpoints saved before load after."""
    assert [f.name for f in dataclasses.fields(linconv.LinearizeConfig)] == [
        "attention",
        "group_size",
        "sinks",
        "conv_kernel",
        "conv_mask",
        "keep_softmax_layers",
        "softmax_every",
        "chunk_size",
        "linformer_rank",
        "linformer_max_len",
        "allow_noncausal",
        "seed",
        "source",
        "format_version",
    ]


def test_a_config_saved_before_sinks_existed_loads_without_sinks():
    old = linconv.LinearizeConfig(group_size=16).to_dict()
    assert linconv.LinearizeConfig.from_dict(old).sink_count == 16  # today's default: the whole first group
    del old["sinks"]
    assert linconv.LinearizeConfig.from_dict(old).sink_count == 0


def test_default_sinks_are_a_group_and_only_where_there_is_a_local_score():
    specs = linconv.LinearizeConfig(attention="transnormer", group_size=16).validate().specs(4)
    assert [s.sinks for s in specs] == [16, 16, 0, 0]  # block softmax below, no local score above
    assert all(s.sinks == 0 for s in RECIPES["paper"].linearize_config().validate().specs(2))  # the paper's exact form


@pytest.mark.parametrize(
    "options,message",
    [
        ({"sinks": -1}, "--sinks must be between 0 and --group-size"),
        ({"sinks": 17, "group_size": 16}, "--sinks must be between 0 and --group-size"),
        ({"sinks": 4, "attention": "hedgehog"}, "--sinks needs a variant with a local score"),
    ],
)
def test_impossible_sinks_are_refused(options, message):
    with pytest.raises(LinconvError, match=message):
        linconv.LinearizeConfig(**options).validate()


def test_attention_never_imports_the_config():
    package = Path(linconv.__file__).parent
    for path in (package / "attention").glob("*.py"):
        assert "linconv.config" not in path.read_text(), path
