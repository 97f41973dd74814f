"""The leakage check as a guard: it passes every causal variant and flags every kind of leak —
declared (linformer, an unmasked conv), hidden by a zero-initialised parameter, injected into the
conv, or reaching across a group boundary that a short check would never cross."""

import pytest
import torch
from conftest import converted, tiny_model
from test_model import CAUSAL

import linconv
from linconv import ops
from linconv.attention.variants import VARIANTS
from linconv.bench.leakage import leakage_check
from linconv.models.hf import linconv_tensor_names

GROUPED = [v for v in CAUSAL if VARIANTS[v].form.score or VARIANTS[v].lower_half]  # the others ignore the group size


@pytest.mark.parametrize("variant, group_size", [(v, 64) for v in CAUSAL] + [(v, 256) for v in GROUPED])
def test_every_causal_variant_passes_past_two_group_boundaries(variant, group_size):
    model = converted("llama", variant, group_size=group_size, conv_kernel=5, chunk_size=32)
    before = {n: p.clone() for n, p in model.named_parameters()}
    result = leakage_check(model)
    assert not result.leaks, result
    spans = {group_size if model.model.layers[-1].self_attn.spec.score else 32}
    assert all(sum(b % s == 0 for b in result.boundaries) >= 2 for s in spans), result.boundaries
    assert result.randomized > 0 and result.seq_len > 2 * max(spans)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the randomisation is undone


def test_linformer_is_flagged_from_its_config_and_by_measurement():
    model = converted("llama", "linformer", linformer_rank=8, linformer_max_len=256)
    declared = leakage_check(model)
    assert declared.leaks and "not causal" in declared.declared and declared.cut_points == []
    assert leakage_check(model, trust_config=False).leaks


def test_unmasked_conv_is_flagged_as_converted_and_after_finetuning():
    config = linconv.LinearizeConfig(attention="augmented", group_size=8, conv_kernel=3, conv_mask=False, allow_noncausal=True)
    model = linconv.convert(tiny_model("llama"), config)  # as converted: the conv is all zeros
    assert not any(p.any() for n, p in model.named_parameters() if n.endswith(".conv"))
    assert "unmasked" in leakage_check(model).declared
    assert leakage_check(model, trust_config=False).leaks  # randomised parameters expose the future taps
    assert not leakage_check(model, trust_config=False, randomize=False).leaks  # ...which a zero conv hides
    with torch.no_grad():  # "fine-tuned": the conv has learned weights
        for name in linconv_tensor_names(model):
            if name.endswith(".conv"):
                model.get_parameter(name).normal_(0, 0.3)
    assert leakage_check(model).leaks
    assert leakage_check(model, trust_config=False, randomize=False).leaks


def test_a_conv_that_reads_the_next_token_is_caught(monkeypatch):
    """A future tap weighted by the conv's own (zero-initialised) first tap: invisible without the
    randomisation, caught with it."""
    real = ops.causal_dwconv

    def peeking(v, weight, tail=None):
        y, tail = real(v, weight, tail)
        following = torch.cat([v[:, :, 1:], torch.zeros_like(v[:, :, :1])], 2)  # [B, Hkv, T, D]
        following = following.repeat_interleave(weight.shape[0] // v.shape[1], 1)  # query head h reads value head h // (H // Hkv)
        return y + weight[:, 0].view(1, -1, 1, 1).to(y) * following, tail

    model = linconv.convert(tiny_model("llama"), linconv.LinearizeConfig(group_size=16, conv_kernel=4))
    monkeypatch.setattr(ops, "causal_dwconv", peeking)
    assert not leakage_check(model, randomize=False).leaks
    assert leakage_check(model).leaks


def test_a_leak_across_a_group_boundary_is_caught(monkeypatch):
    """Each position also reads the token one group ahead: only a check longer than a group with a
    cut before a boundary can see it (a 96-token check with groups of 256 could not)."""
    real = ops.grouped_attention
    G = 128

    def far_sighted(q, k, v, state=None, **kw):
        out, new = real(q, k, v, state, **kw)
        ahead = torch.cat([v[:, :, G:], torch.zeros_like(v[:, :, :G])], 2)[:, :, : out.shape[2]]
        ahead = ahead.repeat_interleave(q.shape[1] // v.shape[1], 1)  # v has the kv heads
        return out + 0.1 * ahead.to(out), new

    model = converted("llama", group_size=G)
    monkeypatch.setattr(ops, "grouped_attention", far_sighted)
    result = leakage_check(model)
    assert result.leaks and max(result.cut_points) > G


def test_a_softmax_model_is_checked_too():
    result = leakage_check(tiny_model("gpt2"))
    assert not result.leaks and result.randomized == 0 and result.seq_len <= 128  # GPT-2: its 128 positions
