"""linconv model types for transformers: ``linconv-<family>`` configs and causal-LM classes.

A converted checkpoint's config.json is the base config with ``model_type: linconv-<family>`` and a
``linconv`` section (the LinearizeConfig). A plain transformers that does not know linconv refuses
the unknown model type instead of silently building a softmax model; after ``import linconv``,
``AutoModelForCausalLM.from_pretrained(folder)`` builds the base model and swaps its attention.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.initialization import no_init_weights

from linconv.attention.module import LinconvAttention
from linconv.attention.state import LinconvCache
from linconv.config import LinearizeConfig
from linconv.errors import LinconvError
from linconv.models import get_adapter


def linearize_(model: nn.Module, cfg: LinearizeConfig, model_type: str) -> None:
    """Replace the attention of every layer that ``cfg`` does not keep softmax, in place."""
    adapter = get_adapter(model_type)
    blocks = adapter.blocks(model)
    specs = cfg.validate(len(blocks)).specs(len(blocks))
    dims = adapter.dims(model.config)
    for i, (block, spec) in enumerate(zip(blocks, specs)):
        if spec is not None:
            old = getattr(block, adapter.attn_name)
            ref = next(old.parameters())
            new = LinconvAttention(old, adapter, i, spec, dims).to(device=ref.device)
            setattr(block, adapter.attn_name, new)


def linconv_tensor_names(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers that linconv added (not the reused projections)."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, LinconvAttention):
            own = [*module.named_parameters(), *module.named_buffers()]
            names += [f"{prefix}.{n}" for n, _ in own if n.split(".")[0] not in module.adapter.projections]
    return names


def _linconv_classes(family: str, config_cls: type, model_cls: type) -> tuple[type, type]:
    @strict
    class Config(config_cls):
        model_type = f"linconv-{family}"
        linconv: dict | None = None

    class Model(model_cls):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            linearize_(self, LinearizeConfig.from_dict(config.linconv or {}), config.model_type)

        @property
        def linconv_config(self) -> LinearizeConfig:
            return LinearizeConfig.from_dict(self.config.linconv)

        def new_cache(self) -> LinconvCache:
            """An empty decoding state for this model."""
            return LinconvCache(self.config.num_hidden_layers)

        def generate(self, *args, **kwargs):
            """transformers' generate, decoding from a LinconvCache unless one is given.

            Padding would enter the recurrent state, so padded batches are refused: use
            ``linconv.generate.generate``, which runs prompts of different lengths separately.
            """
            mask = kwargs.get("attention_mask")
            if mask is not None and not bool(mask.all()):
                raise LinconvError("a linconv model cannot decode padded batches with model.generate; use linconv.generate.generate")
            if kwargs.get("cache") is None:
                kwargs["cache"] = self.new_cache()
            return super().generate(*args, **kwargs)

    name = "Linconv" + model_cls.__name__
    Config.__name__ = Config.__qualname__ = name.replace("ForCausalLM", "").replace("LMHeadModel", "") + "Config"
    Model.__name__ = Model.__qualname__ = name
    return Config, Model


BASES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}
CLASSES: dict[str, tuple[type, type]] = {family: _linconv_classes(family, *classes) for family, classes in BASES.items()}
for _config_cls, _model_cls in CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls)
    AutoModelForCausalLM.register(_config_cls, _model_cls)


def is_linconv(config: PretrainedConfig | dict) -> bool:
    """Whether ``config`` (a config object, or a config.json read as a dict) is a linconv checkpoint's."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return str(model_type or "").startswith("linconv-")


def linconv_config_for(base: PretrainedConfig, cfg: LinearizeConfig) -> PretrainedConfig:
    """The linconv config of a converted ``base`` model: every base field plus the linconv section."""
    config_cls, _ = CLASSES[get_adapter(base.model_type).family]
    fields = {k: v for k, v in base.to_dict().items() if k not in ("model_type", "architectures", "quantization_config")}
    config = config_cls(**fields, linconv=cfg.to_dict())
    config.architectures = [CLASSES[get_adapter(base.model_type).family][1].__name__]
    return config


def build_linconv_model(base: nn.Module, cfg: LinearizeConfig) -> nn.Module:
    """A linconv model holding ``base``'s weights; its own new parameters take their deterministic init."""
    config = linconv_config_for(base.config, cfg)
    _, model_cls = CLASSES[get_adapter(base.config.model_type).family]
    ref = next(base.parameters())
    with torch.device(ref.device), no_init_weights():  # every base weight is loaded below
        model = model_cls(config).to(ref.dtype)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and set(missing) <= set(linconv_tensor_names(model)), (missing, unexpected)
    model.tie_weights()  # no_init_weights also skipped tying
    model.generation_config = base.generation_config
    return model.eval()
