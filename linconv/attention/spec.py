"""What one converted layer computes, decided once: the contract between the config and the module.

A variant (``variants.py``) names a ``Form`` for each layer: its feature map, its local score, how
q and k are prepared, whether it has a denominator. ``LinearizeConfig.specs`` adds the options
(conv, group and chunk sizes, the layer's seed, Linformer's projection) and builds one
``AttentionSpec`` per converted layer; ``LinconvAttention`` reads nothing else, so attention never
imports the config. The names are checked against their registries (``FEATURE_MAPS``,
``ops.SCORES``) when a spec is built: a typo fails at conversion, listing the choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from linconv.attention.features import FEATURE_MAPS
from linconv.errors import LinconvError
from linconv.ops import SCORES

T = TypeVar("T")


def registered(kind: str, name: str, registry: Mapping[str, T]) -> T:
    """``registry[name]``; an unknown name is a LinconvError that lists the choices."""
    if name not in registry:
        raise LinconvError(f"unknown {kind} {name!r}; choose from: {', '.join(registry)}")
    return registry[name]


@dataclass(frozen=True)
class Form:
    """The formulation of a layer: a global linear part, a local part inside groups (or both, added
    with a learnable weight α), or Linformer's projection along the sequence."""

    feature: str | None = None  # feature map φ of the global linear part, a FEATURE_MAPS name (None: no global part)
    score: str | None = None  # quadratic score inside groups, an ops.SCORES name (None: no local part)
    normalize: bool = True  # denominator; without it the output is RMS-normalised per head (TransNormer)
    unit_qk: bool = False  # L2-normalise q and k first (the paper's relu² and yoso scores)
    scale_q: bool = False  # multiply q by 1/√D first: the model's own softmax scale (softmax score)
    linformer: bool = False  # keys/values projected along the sequence axis: reads later tokens


@dataclass(frozen=True, kw_only=True)
class AttentionSpec(Form):
    """A layer's form with the options that apply to it; built by ``LinearizeConfig.specs``."""

    variant: str  # the registry name, for messages
    conv_taps: int  # K: DWConv taps on V, the current token and K−1 earlier ones (0: no conv)
    conv_mask: bool  # False: the conv also reads K−1 later tokens (the paper's ablation)
    group_size: int
    sinks: int  # first tokens of the sequence every later group also scores locally (attention sinks; 0: none)
    chunk_size: int
    seed: int  # this layer's seed: performer's and Linformer's random projections
    linformer_rank: int
    linformer_max_len: int

    def __post_init__(self):
        for kind, name, registry in (("feature map", self.feature, FEATURE_MAPS), ("local score", self.score, SCORES)):
            if name is not None:
                registered(kind, name, registry)
        if self.linformer == bool(self.feature or self.score):
            raise LinconvError(f"variant {self.variant!r}: a layer has a feature map and/or a local score, or else is a Linformer")

    @property
    def leak(self) -> str | None:
        """What lets this layer read later tokens, in words (None: it is causal)."""
        if self.linformer:
            return f"variant {self.variant!r}"
        if self.conv_taps and not self.conv_mask:
            return "an unmasked convolution"
        return None

    @property
    def causal(self) -> bool:
        """No output reads a later token, so the layer can decode step by step."""
        return self.leak is None
