"""The registry of attention variants: one explicit dict, each entry a formulation and a line of help.

A variant is a combination of the ops, written as a ``Form`` (``spec.py``): an optional kernelized
*global* part (feature map φ, with or without the denominator), an optional *local* quadratic score
inside groups, and how q, k are prepared. The masked DWConv is an option on top of any variant
(``conv_kernel``); the augmented variants, ``augmented-softmax`` (the default) and ``augmented``
(the paper's), turn it on by default. ``linformer`` is kept to reproduce the paper's finding and is
not causal. ``LinearizeConfig.specs`` resolves the variant once into one ``AttentionSpec`` per layer.

How to add a variant
--------------------
- Built from parts that exist: add one ``Variant(name, description, Form(...))`` to ``VARIANTS``
  below; that is the only edit. ``--attention NAME`` and its ``--help`` line, conversion,
  checkpoints (config.json stores the name and the options) and every test parametrised over the
  registry (recurrent == parallel logits, leakage, speculative == greedy, generate) take it up.
  ``default_conv=32`` turns the masked DWConv on by default; ``lower_half=Form(...)`` gives the
  layers below the middle another form (TransNormer's block softmax).
- A new feature map: a ``FeatureMap`` subclass built from (heads, head dim, seed) and one
  ``FEATURE_MAPS`` entry in ``features.py``; its parameters and buffers are saved with the model.
- A new local score: a function ``(logits, mask) -> (weights, log-shift)`` and one ``SCORES`` entry
  in ``ops/local.py``; ``tests/ops`` checks every registered score against the reference loop, on
  trees and in gradients.
- A formulation that is none of these (a new way to mix tokens) needs a ``Form`` field, its branch
  in ``LinconvAttention.attend`` and its ops with a slow reference in ``ops/reference.py``.
Unknown feature-map or score names fail when the spec is built, listing the choices.
"""

from __future__ import annotations

from dataclasses import dataclass

from linconv.attention.spec import Form, registered


@dataclass(frozen=True)
class Variant:
    name: str
    description: str  # one line of ``--attention`` help
    form: Form
    default_conv: int = 0  # DWConv taps when the user does not say (0: none)
    lower_half: Form | None = None  # the form of layers below num_layers // 2 (None: ``form`` everywhere)

    @property
    def causal(self) -> bool:
        """Whether the formulation itself reads no later token (the conv options aside)."""
        return not any(f.linformer for f in (self.form, self.lower_half) if f is not None)

    def layer_forms(self, num_layers: int) -> list[Form]:
        """The form of each layer of a model with ``num_layers`` layers."""
        return [self.lower_half if self.lower_half and i < num_layers // 2 else self.form for i in range(num_layers)]


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("relu", "φ = ReLU with denominator (the paper's ReLU baseline)", Form(feature="relu")),
        Variant("elu", "φ = ELU + 1 with denominator (Katharopoulos et al.)", Form(feature="elu")),
        Variant("performer", "FAVOR+ positive orthogonal random features of the softmax kernel", Form(feature="performer")),
        Variant(
            "transnormer",
            "ReLU kernel, no denominator, normalised output; block softmax in the lower layers",
            Form(feature="relu", normalize=False),
            lower_half=Form(score="softmax", scale_q=True),  # DiagAttention
        ),
        Variant("flash-local", "FLASH local half: relu² attention inside each group only", Form(score="relu2", unit_qk=True)),
        Variant(
            "flash-global",
            "FLASH global half: linear attention (no feature map) across tokens",
            Form(feature="identity", normalize=False),
        ),
        Variant(
            "yoso",
            "YOSO expected LSH-Bernoulli score (1 − arccos(q̂·k̂)/π)^τ inside groups",
            Form(score="yoso", unit_qk=True),
        ),
        Variant("linformer", "keys/values projected along the sequence axis; NOT causal", Form(linformer=True)),
        Variant("hedgehog", "learnable feature map [softmax(Wx), softmax(−Wx)] (LoLCATs)", Form(feature="hedgehog")),
        Variant(
            "augmented",
            "the paper's method: grouped local relu² + global linear (α) + masked DWConv on V",
            Form(feature="relu", score="relu2", unit_qk=True),
            default_conv=32,
        ),
        Variant(
            "augmented-softmax",
            "the augmented form with the model's own softmax as the in-group score and a learnable "
            "hedgehog map for the global part (+ α, masked DWConv)",
            Form(feature="hedgehog", score="softmax", scale_q=True),
            default_conv=32,
        ),
    ]
}

DEFAULT_VARIANT = "augmented-softmax"


def get_variant(name: str) -> Variant:
    """The registered variant ``name``; an unknown name is a LinconvError that lists the choices."""
    return registered("attention variant", name, VARIANTS)
