"""The options of a linearized model; saved as the ``linconv`` section of config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from linconv.attention.spec import AttentionSpec
from linconv.attention.variants import DEFAULT_VARIANT, get_variant
from linconv.errors import LinconvError

FORMAT_VERSION = 1
# Bounds that keep one forward pass allocatable: a group is a G x G score map per head (8192: 256 MiB
# per head in fp32, the default model's whole trained context), the conv keeps K - 1 values per head
# and linformer a rank x max-length projection per layer.
MAX_GROUP_SIZE = 8192
MAX_CONV_KERNEL = 1024
MAX_LINFORMER_LEN = 1 << 20
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``fp32``/``bf16``/``fp16`` (or their long names) -> torch dtype; None stays None."""
    if name is None:
        return None
    if name not in DTYPES:
        raise LinconvError(f"unknown dtype {name!r}; choose from: fp32, bf16, fp16")
    return DTYPES[name]


@dataclass
class LinearizeConfig:
    """How softmax attention is replaced. ``conv_kernel=None`` takes the variant's default."""

    attention: str = DEFAULT_VARIANT
    group_size: int = 256  # measured best for augmented-softmax (the paper used 64)
    sinks: int | None = None  # first tokens every later group also attends locally (attention sinks); None: a whole group
    conv_kernel: int | None = None
    conv_mask: bool = True  # False: the paper's conv without its causal mask (ablation; not causal)
    keep_softmax_layers: list[int] = field(default_factory=list)
    softmax_every: int = 0  # also keep every N-th layer softmax (layers N−1, 2N−1, …; 0: none)
    chunk_size: int = 128
    linformer_rank: int = 128
    linformer_max_len: int = 8192
    allow_noncausal: bool = False
    seed: int = 0
    source: str | None = None  # the model this was converted from (the default baseline of bench)
    format_version: int = FORMAT_VERSION

    def kept_layers(self, num_layers: int) -> set[int]:
        """The layers that keep softmax attention in a model of ``num_layers`` layers."""
        every = set(range(self.softmax_every - 1, num_layers, self.softmax_every)) if self.softmax_every else set()
        return set(self.keep_softmax_layers) | every

    @property
    def sink_count(self) -> int:
        """The attention sinks of the grouped layers: ``sinks``, or the whole first group when None
        (measured best on three texts, README "Does the recovery generalise?")."""
        return self.group_size if self.sinks is None else self.sinks

    def specs(self, num_layers: int) -> list[AttentionSpec | None]:
        """What each layer of a ``num_layers``-layer model computes (None: it keeps softmax).

        The one place where the variant's name is resolved: its form for the layer plus the
        options. An unknown variant, feature map or score is a LinconvError listing the choices.
        """
        variant = get_variant(self.attention)
        kept = self.kept_layers(num_layers)
        options = dict(
            variant=variant.name,
            conv_taps=variant.default_conv if self.conv_kernel is None else self.conv_kernel,
            conv_mask=self.conv_mask,
            group_size=self.group_size,
            chunk_size=self.chunk_size,
            linformer_rank=self.linformer_rank,
            linformer_max_len=self.linformer_max_len,
        )
        return [
            None
            if i in kept
            else AttentionSpec(**asdict(form), seed=self.seed * 1000 + i, sinks=self.sink_count if form.score else 0, **options)
            for i, form in enumerate(variant.layer_forms(num_layers))
        ]

    def validate(self, num_layers: int | None = None) -> LinearizeConfig:
        """Raise LinconvError for options that cannot work; return self.

        Before the model is known (``num_layers`` None) a two-layer model stands in, one layer of
        each half, so that every form of the variant is resolved and checked early.
        """
        specs = [s for s in self.specs(2 if num_layers is None else num_layers) if s is not None]
        if self.softmax_every < 0:
            raise LinconvError(f"--softmax-every must be >= 0 (0: no extra softmax layers), got {self.softmax_every}")
        for name in ("group_size", "chunk_size", "linformer_rank", "linformer_max_len"):
            if getattr(self, name) <= 0:
                raise LinconvError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.sink_count <= self.group_size:
            raise LinconvError(
                f"--sinks must be between 0 and --group-size ({self.group_size}): the sinks are the first group's first tokens"
            )
        if self.sinks and not any(s.score for s in specs):  # (None: as many as the layers have)
            raise LinconvError(f"--sinks needs a variant with a local score (variant {self.attention!r} has none)")
        if self.conv_kernel is not None and self.conv_kernel < 0:
            raise LinconvError(f"--conv-kernel must be >= 0 (0 disables the convolution), got {self.conv_kernel}")
        bounds = {"group_size": MAX_GROUP_SIZE, "chunk_size": MAX_GROUP_SIZE, "conv_kernel": MAX_CONV_KERNEL}
        bounds |= {"linformer_max_len": MAX_LINFORMER_LEN, "linformer_rank": self.linformer_max_len}
        for name, bound in bounds.items():
            if (getattr(self, name) or 0) > bound:
                raise LinconvError(f"--{name.replace('_', '-')} must be <= {bound}, got {getattr(self, name)}")
        leak = next((s.leak for s in specs if s.leak), None)
        if leak and not self.allow_noncausal:
            raise LinconvError(
                f"{leak} is not causal (it leaks future tokens and cannot decode); pass --allow-noncausal to build it anyway"
            )
        if num_layers is not None:
            bad = [i for i in self.keep_softmax_layers if not 0 <= i < num_layers]
            if bad:
                raise LinconvError(f"--keep-softmax-layers {bad} out of range: the model has layers 0..{num_layers - 1}")
        if self.format_version > FORMAT_VERSION:
            raise LinconvError(f"checkpoint format {self.format_version} is newer than this linconv ({FORMAT_VERSION}); upgrade linconv")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LinearizeConfig:
        known = {f.name for f in fields(cls)}
        d = {"sinks": 0, **d}  # a checkpoint from before --sinks has none, whatever today's default
        return cls(**{k: v for k, v in d.items() if k in known})
