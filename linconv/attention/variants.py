"""The registry of attention variants: one explicit dict, each entry a formulation and a line of help.

A variant is a combination of the ops: an optional kernelized *global* part (feature map φ, with or
without the denominator), an optional *local* quadratic score inside groups, and how q, k are prepared.
The masked DWConv is an option on top of any variant (``conv_kernel``); the two ``augmented`` variants
turn it on by default, and ``augmented-softmax`` is the default variant. ``linformer`` is kept to
reproduce the paper's finding and is not causal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    feature: str | None = None  # feature map of the global linear part (None: no global part)
    score: str | None = None  # quadratic score inside groups (None: no local part)
    normalize: bool = True  # denominator; without it the output is RMS-normalised per head
    unit_qk: bool = False  # L2-normalise q and k first (the paper's relu² and yoso scores)
    default_conv: int = 0  # DWConv taps when the user does not say (0: none)
    causal: bool = True
    lower: Variant | None = None  # used instead in the lower half of the layers

    def for_layer(self, layer: int, num_layers: int) -> Variant:
        """The formulation layer ``layer`` uses (TransNormer: block softmax in the lower half)."""
        return self.lower if self.lower is not None and layer < num_layers // 2 else self


_DIAG_SOFTMAX = Variant("transnormer-diag", "block-local softmax", score="softmax")

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("relu", "φ = ReLU with denominator (the paper's ReLU baseline)", feature="relu"),
        Variant("elu", "φ = ELU + 1 with denominator (Katharopoulos et al.)", feature="elu"),
        Variant("performer", "FAVOR+ positive orthogonal random features of the softmax kernel", feature="performer"),
        Variant(
            "transnormer",
            "ReLU kernel, no denominator, normalised output; block softmax in the lower layers",
            feature="relu",
            normalize=False,
            lower=_DIAG_SOFTMAX,
        ),
        Variant("flash-local", "FLASH local half: relu² attention inside each group only", score="relu2", unit_qk=True),
        Variant("flash-global", "FLASH global half: linear attention (no feature map) across tokens", feature="identity", normalize=False),
        Variant("yoso", "YOSO expected LSH-Bernoulli score (1 − arccos(q̂·k̂)/π)^τ inside groups", score="yoso", unit_qk=True),
        Variant("linformer", "keys/values projected along the sequence axis; NOT causal", causal=False),
        Variant("hedgehog", "learnable feature map [softmax(Wx), softmax(−Wx)] (LoLCATs)", feature="hedgehog"),
        Variant(
            "augmented",
            "the paper's method: grouped local relu² + global linear (α) + masked DWConv on V",
            feature="relu",
            score="relu2",
            unit_qk=True,
            default_conv=32,
        ),
        Variant(
            "augmented-softmax",
            "the augmented form with the model's own softmax as the in-group score and a learnable "
            "hedgehog map for the global part (+ α, masked DWConv)",
            feature="hedgehog",
            score="softmax",
            default_conv=32,
        ),
    ]
}

DEFAULT_VARIANT = "augmented-softmax"


def get_variant(name: str) -> Variant:
    """The registered variant ``name``; an unknown name is an error that lists the choices."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown attention variant {name!r}; choose from: {', '.join(VARIANTS)}") from None
