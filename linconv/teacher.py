"""The original model, recovered from a converted one without a second copy of its weights.

A converted layer keeps the original q/k/v/o projections and only adds parameters (conv, α, feature
maps), so the original softmax model is still inside it: the same weights with softmax attention of
the same q, k, v, without the added terms and without any LoRA adapters. Distillation uses it as the
teacher (:func:`teacher_mode`); self-generated training text samples from it (:func:`original_model`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.initialization import no_init_weights

from linconv.attention.module import LinconvAttention
from linconv.errors import LinconvError
from linconv.models import get_adapter
from linconv.models.hf import BASES, is_linconv, linconv_tensor_names


@contextmanager
def teacher_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the original model inside the block: no gradient, eval mode, every
    ``LinconvAttention`` computing the softmax attention of its own q, k, v (no linear path, no
    conv, no α), every peft adapter layer disabled. Everything is restored on exit.

    Works for a converted model, a ``PeftModel`` around it, or a model peft has injected LoRA layers
    into (``get_peft_model`` edits the inner model in place, and the fine-tuning calls that one):
    adapters are toggled on peft's tuner layers themselves, which is what ``PeftModel.disable_adapter``
    does underneath. peft's toggle also resets ``requires_grad`` of the adapter weights, so those
    flags are saved and put back.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer  # here: peft costs bench and generate 0.5 s of import

    attns = [m for m in model.modules() if isinstance(m, LinconvAttention)]
    tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    grads = {p: p.requires_grad for p in model.parameters()}
    disabled = [m.disable_adapters for m in tuners]
    modes = {m: m.training for m in model.modules()}
    try:
        for m in attns:
            m.teacher = True
        for m in tuners:
            m.enable_adapters(False)
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        for m, mode in modes.items():
            m.training = mode  # per module: train() would recurse
        for m in attns:
            m.teacher = False
        for m, was in zip(tuners, disabled):
            m.enable_adapters(not was)
        for p, flag in grads.items():
            p.requires_grad_(flag)


def original_model(model: nn.Module) -> nn.Module:
    """The plain transformers model (softmax attention) whose parameters ARE ``model``'s tensors.

    For generating with transformers' KV cache (the teacher mode above cannot decode step by step).
    The weights are shared, not copied: a change to one is a change to the other. ``model`` is a
    converted model without adapters (merge or unload them first); a softmax model is returned as is.
    """
    if not is_linconv(model.config):
        return model
    added = set(linconv_tensor_names(model))
    state = {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in added}
    if any(".base_layer." in n or ".lora_" in n for n in state):
        raise LinconvError("the original model cannot be taken from a model with LoRA adapters; merge them first")
    family = get_adapter(model.config.model_type).family
    config_cls, model_cls = BASES[family]
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures", "linconv")}
    config = config_cls(**fields)
    ref = next(model.parameters())
    with torch.device(ref.device), no_init_weights():  # every weight is replaced below
        base = model_cls(config).to(ref.dtype)
    missing, unexpected = base.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise LinconvError(f"the converted model does not match its base architecture (e.g. {(missing + unexpected)[0]})")
    base.tie_weights()
    base.generation_config = model.generation_config
    return base.eval()
