"""Converted models: recurrent == parallel logits, causality, generate, checkpoints round trip."""

import subprocess
import sys

import pytest
import torch
from conftest import TINY_ARCHS, converted, tiny_config
from transformers import AutoModelForCausalLM

import linconv
from linconv.attention.module import LinconvAttention
from linconv.attention.variants import VARIANTS
from linconv.checkpoint import save_checkpoint
from linconv.errors import LinconvError
from linconv.models import get_adapter

CAUSAL = [n for n, v in VARIANTS.items() if v.causal]


def tiny_base(arch, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, eos_token_id=None)
    return AutoModelForCausalLM.from_config(cfg).eval()


def decode_logits(model, ids, prefill):
    """Prefill ``prefill`` tokens, then feed the rest one at a time through a LinconvCache."""
    cache = model.new_cache()
    out = [model(ids[:, :prefill], cache=cache).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], cache=cache).logits)
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("variant,sinks", [(v, None) for v in CAUSAL] + [(None, 0), (None, 2), ("augmented", 1)])  # None: a group
@torch.inference_mode()
def test_recurrent_decode_equals_parallel_forward(arch, variant, sinks):
    model = converted(arch, variant, sinks=sinks)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    full = model(ids, use_cache=False).logits
    step, cache = decode_logits(model, ids, prefill=5)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 13


@pytest.mark.parametrize("variant", ["augmented-softmax", "relu"])
def test_a_long_forward_runs_in_slices_with_the_same_outputs_and_gradients(variant, monkeypatch):
    """Slicing bounds the temporaries of one forward; it must not change outputs, gradients or the state."""
    import linconv.attention.module as M

    model = converted("llama", variant, group_size=6, conv_kernel=5)
    ids = torch.randint(0, 90, (2, 57))
    runs = {}
    for slice_tokens in (10**6, 16):  # whole segment, then slices of 12 tokens (two groups of 6)
        monkeypatch.setattr(M, "SLICE_TOKENS", slice_tokens)
        model.zero_grad()
        logits = model(ids, use_cache=False).logits
        logits.square().mean().backward()
        cache = model.new_cache()
        with torch.inference_mode():
            model(ids[:, :5], cache=cache)
            model(ids[:, 5:], cache=cache)  # continues a state whose group is part-filled
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        runs[slice_tokens] = (logits.detach(), grads, [t for s in cache.states for t in s.tensors()])
    (a, ga, sa), (b, gb, sb) = runs.values()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for x, y in zip(ga + sa, gb + sb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant,sinks", [("augmented-softmax", 0), ("augmented-softmax", 3), ("augmented", 0), ("hedgehog", 0)])
@torch.inference_mode()
def test_state_is_allocated_once_and_never_changes_size(variant, sinks):
    """The same bytes at every position in the group, no new state tensor for any decoded token,
    and the group buffer / conv tail held at the key/value head count (2 of the 4 query heads)."""
    G, K = 8, 5
    model = converted("llama", variant, group_size=G, conv_kernel=K, sinks=sinks)
    H, Hkv, D = 4, 2, 8
    F = {"augmented-softmax": 2 * D, "augmented": D, "hedgehog": 2 * D}[variant]
    buffers = 2 * Hkv * (G + sinks) * D if variant.startswith("augmented") else 0  # the group's and the sinks' keys/values
    flag = 1 if variant.startswith("augmented") else 0  # one bool: the sinks are held
    want = 2 * (4 * (H * F * D + H * F + buffers + Hkv * (K - 1) * D) + flag)  # layers x (fp32 S, z, k/v buffers, conv tail)
    for n in (1, G - 1, G, G + 1, 3 * G + 5):
        ids = torch.randint(4, 90, (1, n + 2 * G))
        cache = model.new_cache()
        model(ids[:, :n], cache=cache)
        storage = [t.data_ptr() for s in cache.states for t in s.tensors()]
        assert cache.nbytes() == want, n
        for t in range(n, n + 2 * G):  # decode across two group boundaries
            model(ids[:, t : t + 1], cache=cache)
            assert cache.nbytes() == want and [t.data_ptr() for s in cache.states for t in s.tensors()] == storage, (n, t)


def test_unmasked_conv_has_its_future_taps_and_cannot_decode():
    model = converted("llama", "augmented", conv_mask=False)
    assert model.model.layers[0].self_attn.conv.shape[-1] == 2 * 3 - 1
    with pytest.raises(LinconvError, match="not causal"):
        model.generate(torch.randint(0, 90, (1, 5)), max_new_tokens=2)


@pytest.mark.parametrize("options", [dict(attention="linformer"), dict(conv_mask=False)])
def test_convert_refuses_noncausal_without_permission(options):
    with pytest.raises(LinconvError, match="not causal"):
        linconv.convert(tiny_base("llama"), linconv.LinearizeConfig(**options))
    linconv.LinearizeConfig(conv_mask=False, conv_kernel=0).validate()  # no conv, nothing to leak


@torch.inference_mode()
def test_generate_matches_greedy_loop():
    model = converted("qwen2")
    ids = torch.randint(4, 90, (1, 6))
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    seq = ids
    for _ in range(8):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_kept_softmax_layers_are_untouched():
    base = tiny_base("llama")
    original = base.model.layers[1].self_attn
    model = linconv.convert(base, linconv.LinearizeConfig(keep_softmax_layers=[1]))
    blocks = get_adapter("llama").blocks(model)
    assert isinstance(blocks[0].self_attn, LinconvAttention)
    kept = blocks[1].self_attn
    assert type(kept) is type(original)
    for (n, a), (_, b) in zip(kept.named_parameters(), original.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.inference_mode()
def test_checkpoint_round_trip_is_bit_identical(arch, tmp_path):
    model = converted(arch, "hedgehog" if arch == "gpt2" else "augmented", keep_softmax_layers=[0])
    save_checkpoint(model, None, tmp_path / "ckpt", card={"test": True})
    loaded, _ = linconv.load(tmp_path / "ckpt")
    ids = torch.randint(0, 90, (2, 11))
    assert torch.equal(model(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits)
    assert type(loaded) is type(model)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(model(ids, use_cache=False).logits, reloaded(ids, use_cache=False).logits)
    assert not list(tmp_path.glob(".ckpt*")), "temporary folders left behind"


def test_plain_transformers_refuses_a_linconv_checkpoint(tmp_path):
    save_checkpoint(converted("llama"), None, tmp_path / "ckpt", card={})
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "linconv-llama" in run.stderr


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = converted("llama")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, None, tmp_path / "out", card={})
    assert list(tmp_path.iterdir()) == []


def test_conversion_is_deterministic():
    a, b = (linconv.convert(tiny_base("llama"), linconv.LinearizeConfig(attention="performer")) for _ in range(2))
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_tied_embeddings_stay_tied():
    model = linconv.convert(AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=True)))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_noncausal_variant_refuses_to_decode():
    model = converted("llama", "linformer", linformer_rank=8, linformer_max_len=64)
    with pytest.raises(LinconvError, match="cannot decode"):
        model(torch.randint(0, 90, (1, 5)), cache=model.new_cache())


def test_attention_transfer_mode_returns_teacher_and_loss():
    model = converted("llama")
    base = tiny_base("llama")
    ids = torch.randint(0, 90, (1, 12))
    attns = [m for m in model.modules() if isinstance(m, LinconvAttention)]
    for m in attns:
        m.transfer = True
    out = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, base(ids, use_cache=False).logits, atol=1e-5, rtol=1e-4)
    assert all(m.transfer_loss is not None and m.transfer_loss.item() > 0 for m in attns)


def test_transformers_generate_refuses_padded_batches():
    model = converted("llama")
    ids = torch.randint(4, 90, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(LinconvError, match="padded"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
