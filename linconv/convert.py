"""Conversion: a Hugging Face causal LM in, the same model with linear attention out."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from linconv.attention.module import LinconvAttention
from linconv.checkpoint import load, made_by
from linconv.config import LinearizeConfig
from linconv.models import ADAPTERS, get_adapter
from linconv.models.hf import build_linconv_model, linconv_tensor_names
from linconv.sources import load_source, source_name


@dataclass
class ConversionSummary:
    architecture: str
    variant: str
    layers: int
    converted: list[int]
    kept: list[int]
    params_added: int
    conv_kernel: int
    group_size: int
    sinks: int


def convert(
    model_or_path: nn.Module | str | Path | None = None,
    config: LinearizeConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Return a linconv model with ``model_or_path``'s weights and ``config``'s attention.

    ``model_or_path``: a loaded transformers causal LM, a local folder, a hub id, a .gguf file, or
    None for the default model. The new attention's own parameters get a seeded, deterministic init.
    """
    if not isinstance(model_or_path, nn.Module):
        return load_and_convert(model_or_path, config, dtype=dtype, device=device)[0]
    get_adapter(model_or_path.config.model_type)
    return build_linconv_model(model_or_path, config or LinearizeConfig())


def load_and_convert(
    source: str | Path | None = None,
    config: LinearizeConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, PreTrainedTokenizerBase, nn.Module]:
    """``(converted, tokenizer, original)`` from a source (None: the default model, see
    :func:`~linconv.sources.load_source`); the config records the source, which bench's baseline reads back."""
    original, tokenizer = load_source(source, ADAPTERS, dtype=dtype or torch.float32, device=device)
    config = replace(config or LinearizeConfig(), source=source_name(source))
    return convert(original, config), tokenizer, original


def load_or_convert(
    checkpoint: str | Path | None, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, PreTrainedTokenizerBase | None, nn.Module | None]:
    """``(model, tokenizer, original)``: the linconv checkpoint folder ``checkpoint`` (original None),
    or for None a fresh conversion of the default model with the default options."""
    if checkpoint is None:
        return load_and_convert(None, dtype=dtype, device=device)
    model, tokenizer = load(checkpoint, dtype=dtype, device=device)
    return model, tokenizer, None


def conversion_card(model: nn.Module, recipe: str | None = None) -> dict:
    """The ``linconv.json``/README card of a converted ``model``: what made it and when, its source,
    the recipe named and every option."""
    options = dict(model.config.linconv)
    return {**made_by("convert"), "source": options.pop("source", None), "recipe": recipe, **options}


def summarize(model: nn.Module) -> ConversionSummary:
    """What a conversion did, for the report."""
    cfg = LinearizeConfig.from_dict(model.config.linconv)
    blocks = get_adapter(model.config.model_type).blocks(model)
    converted = [i for i, b in enumerate(blocks) if any(isinstance(m, LinconvAttention) for m in b.children())]
    params = dict(model.named_parameters())
    specs = [s for s in cfg.specs(len(blocks)) if s is not None]
    return ConversionSummary(
        architecture=model.config.model_type.removeprefix("linconv-"),
        variant=cfg.attention,
        layers=len(blocks),
        converted=converted,
        kept=[i for i in range(len(blocks)) if i not in converted],
        params_added=sum(params[n].numel() for n in linconv_tensor_names(model) if n in params),
        conv_kernel=max((s.conv_taps for s in specs), default=0),
        group_size=cfg.group_size,
        sinks=max((s.sinks for s in specs), default=0),
    )
