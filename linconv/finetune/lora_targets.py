"""Which projections get LoRA adapters: the user's short names (q,k,v,o) or the model's own, mapped
to module names per architecture (one fused projection in GPT-2)."""

from __future__ import annotations

from torch import nn

from linconv.errors import LinconvError
from linconv.models import get_adapter


def lora_projections(model_type: str, targets: str) -> list[str]:
    """The projection names meant by ``targets`` ("q,k,v,o" or the architecture's own names).

    Llama-like models map q,k,v,o to q_proj,k_proj,v_proj,o_proj; GPT-2 maps q,k,v to its fused
    c_attn and o to c_proj. An unknown target is a LinconvError listing the valid ones.
    """
    adapter = get_adapter(model_type)
    proj = adapter.projections
    short = dict(zip("qkvo", proj)) if len(proj) == 4 else {"q": proj[0], "k": proj[0], "v": proj[0], "o": proj[-1]}
    valid = ", ".join([*short, *proj])
    chosen: list[str] = []
    for t in (t.strip() for t in targets.split(",")):
        if not t:
            continue
        name = short.get(t, t if t in proj else None)
        if name is None:
            raise LinconvError(f"unknown LoRA target {t!r} for a {adapter.family} model; valid targets: {valid}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise LinconvError(f"--lora-targets is empty; valid targets: {valid}")
    return chosen


def lora_target_modules(model: nn.Module, targets: str) -> list[str]:
    """Full module names for ``targets`` in every attention layer, converted or kept as softmax."""
    adapter = get_adapter(model.config.model_type)
    chosen = lora_projections(model.config.model_type, targets)
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names[id(getattr(b, adapter.attn_name))]}.{p}" for b in adapter.blocks(model) for p in chosen]
