"""Distillation from the original model: the chunked KL equals a direct KL from full logits (values,
gradients, temperature), and the teacher path really is the unconverted model, with LoRA adapters
and kept softmax layers too, without a second copy of the weights."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, converted, tiny_model
from peft import LoraConfig, get_peft_model

from linconv.attention.module import LinconvAttention
from linconv.errors import LinconvError
from linconv.loss import chunked_kl, distill_loss, lm_loss
from linconv.teacher import original_model, teacher_mode

IDS = torch.randint(4, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def direct_kl(student_logits, teacher_logits, temperature):
    """Σ over rows of T²·Σ_v p (log p − log q): full logits, written out by hand."""
    p = torch.softmax(teacher_logits / temperature, -1)
    log_q = torch.log_softmax(student_logits / temperature, -1)
    return temperature**2 * (p * (p.log() - log_q)).sum()


def hidden_and_head(seed=0, n=37, d=16, v=50):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g))
    student = torch.randn(n, d, generator=g).requires_grad_()
    teacher = torch.randn(n, d, generator=g)
    return student, teacher, head


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("chunk", [5, None])  # 5: many checkpointed chunks; None: one chunk
def test_chunked_kl_equals_direct_kl_values_and_gradients(temperature, chunk):
    student, teacher, head = hidden_and_head()
    ours = chunked_kl(student, teacher, head, temperature, chunk_tokens=chunk)
    ours.backward()
    grads = student.grad.clone(), head.weight.grad.clone()
    student.grad, head.weight.grad = None, None
    ref = direct_kl(head(student), head(teacher).detach(), temperature)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], student.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], head.weight.grad, rtol=1e-4, atol=1e-6)


def test_temperature_t_squared_scaling_has_the_high_temperature_limit():
    """T²·KL(softmax(zt/T) ‖ softmax(zs/T)) → Σ_rows (1/2V)·Σ_v (d_v − mean d)², d = zt − zs, as T → ∞:
    with the T² factor the loss (and its gradient) keeps its size whatever the temperature."""
    student, teacher, head = hidden_and_head(seed=1)
    student, head = student.detach(), head.requires_grad_(False)
    d = head(teacher) - head(student)
    limit = ((d - d.mean(-1, keepdim=True)) ** 2).sum() / (2 * d.shape[-1])
    high = chunked_kl(student, teacher, head, 1000.0, chunk_tokens=8)
    torch.testing.assert_close(high, limit, rtol=2e-2, atol=0)
    unscaled = F.kl_div(F.log_softmax(head(student) / 1000, -1), F.log_softmax(head(teacher) / 1000, -1), log_target=True, reduction="sum")
    assert float(unscaled) < 1e-5 * float(limit)  # without T² it would vanish


def test_mix_is_alpha_ce_plus_one_minus_alpha_kl():
    student, teacher, head = hidden_and_head(seed=2)
    targets = torch.randint(0, 50, (student.shape[0],), generator=torch.Generator().manual_seed(0))
    ce = F.cross_entropy(head(student), targets, reduction="sum")
    kl = direct_kl(head(student), head(teacher).detach(), 2.0)
    mixed = chunked_kl(student, teacher, head, 2.0, chunk_tokens=6, targets=targets, alpha=0.3)
    torch.testing.assert_close(mixed, 0.3 * ce + 0.7 * kl)
    only_ce = chunked_kl(student, teacher, head, 2.0, targets=targets, alpha=1.0)
    torch.testing.assert_close(only_ce, ce)
    with pytest.raises(ValueError):
        chunked_kl(student, teacher, head, alpha=0.5)  # no targets


def test_kl_is_zero_with_zero_gradient_when_student_is_teacher():
    student, _, head = hidden_and_head(seed=3)
    loss = chunked_kl(student, student.detach().clone(), head, 2.0, chunk_tokens=7)
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert float(student.grad.abs().max()) < 1e-5


def logits(model, ids=IDS):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_teacher_logits_equal_the_unconverted_model(arch):
    original = tiny_model(arch, eos_token_id=None)
    model = converted(arch)  # new parameters moved off their init: conv and α would show
    with torch.no_grad():
        student = logits(model)
    with teacher_mode(model):
        teacher = logits(model)
    torch.testing.assert_close(teacher, logits(original).detach(), atol=1e-5, rtol=1e-5)
    assert (student - teacher).abs().max() > 1e-2  # outside the block the model is linear again
    torch.testing.assert_close(logits(model).detach(), student)


def test_teacher_of_a_hybrid_keeps_its_softmax_layers():
    original = tiny_model("llama", eos_token_id=None)
    model = converted("llama", keep_softmax_layers=[0])
    assert sum(isinstance(m, LinconvAttention) for m in model.modules()) == 1
    with teacher_mode(model):
        torch.testing.assert_close(logits(model), logits(original).detach(), atol=1e-5, rtol=1e-5)


def lora(model):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers alias
        peft = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))  # B starts at zero: make the adapters count
    return peft


@pytest.mark.parametrize("wrapped", [True, False], ids=["peft-model", "injected-model"])
def test_teacher_disables_lora_adapters_and_restores_them(wrapped):
    original = tiny_model("llama", eos_token_id=None)
    base = converted("llama")
    with torch.no_grad():
        without = logits(base)
    peft = lora(base)
    model = peft if wrapped else base  # fine-tuning calls the inner model that peft edited in place
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_B" in name)  # peft's own re-enabling would unfreeze lora_A
    next(m for m in model.modules() if isinstance(m, LinconvAttention)).eval()  # a mixed train/eval model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    with torch.no_grad():
        student = logits(model)
    assert (student - without).abs().max() > 1e-2  # the adapters change the output
    with teacher_mode(model):
        torch.testing.assert_close(logits(model), logits(original).detach(), atol=1e-5, rtol=1e-5)
    assert [m.training for m in model.modules()] == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        torch.testing.assert_close(logits(model), student)


def test_teacher_mode_refuses_step_decoding():
    model = converted("llama")
    with teacher_mode(model), pytest.raises(LinconvError, match="teacher mode"):
        model(IDS[:1, :4], cache=model.new_cache(), use_cache=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_original_model_shares_the_weights_and_equals_the_unconverted(arch):
    original = tiny_model(arch, eos_token_id=None)
    model = converted(arch)
    view = original_model(model)
    assert not any(isinstance(m, LinconvAttention) for m in view.modules())
    torch.testing.assert_close(logits(view), logits(original), atol=1e-5, rtol=1e-5)
    own = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in own for p in view.parameters())  # no second copy
    assert original_model(original) is original


def test_original_model_refuses_unmerged_adapters():
    with pytest.raises(LinconvError, match="LoRA"):
        original_model(lora(converted("llama")).get_base_model())


def test_distill_loss_is_the_kl_to_the_original_and_trains_only_the_student():
    original = tiny_model("llama", eos_token_id=None)
    model = converted("llama")
    model.requires_grad_(False)
    alpha = next(p for n, p in model.named_parameters() if n.endswith("alpha")).requires_grad_()
    loss = distill_loss(model, IDS, temperature=2.0)
    n = IDS.shape[0] * (IDS.shape[1] - 1)
    ref = direct_kl(logits(model)[:, :-1].reshape(n, -1), logits(original)[:, :-1].reshape(n, -1).detach(), 2.0) / n
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert alpha.grad is not None and alpha.grad.abs() > 0
    assert distill_loss(original, IDS).item() == pytest.approx(0.0, abs=1e-6)  # a softmax model is its own teacher
    mixed = distill_loss(model, IDS, temperature=2.0, alpha=0.25)
    torch.testing.assert_close(mixed, 0.25 * lm_loss(model, IDS) + 0.75 * ref, rtol=1e-5, atol=1e-6)
