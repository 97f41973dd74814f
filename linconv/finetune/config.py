"""What a fine-tune run is asked to do (:class:`FinetuneConfig`) and what it returns (the results)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from linconv.data import parse_text_mix
from linconv.errors import LinconvError
from linconv.finetune.stages import STAGES, planned
from linconv.selfgen import SOURCE as SELFGEN
from linconv.speculative.eagle_train import EagleTrainConfig

LOSSES = ("ce", "kl", "mix")  # of the LoRA stage; kl and mix distil the original model (linconv.loss.distill_loss)
DRAFT_HEADS = ("eagle",)  # --draft-head: draft heads trained as the last stage (Medusa has --medusa-heads)
PRECISIONS = {"fp32": "no", "float32": "no", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}
# options that do not change what is trained: they may differ between a run and its resume
_NOT_FINGERPRINTED = {"eval_every", "eval_windows", "eval_text", "save_every", "merge", "gradient_checkpointing", "draft_shape_prompts"}
_EAGLE = EagleTrainConfig()


@dataclass
class FinetuneConfig:
    """Everything a fine-tune run needs besides its input and output folders."""

    text: str | None = None  # training text: None (built-in train split), file, folder or datasets name
    transfer_steps: int = 40  # the measured default recipe (README, "Does the recovery generalise?")
    lora_steps: int = 120
    medusa_heads: int = 0
    medusa_steps: int = 100
    seq_len: int = 512
    batch_size: int = 1  # windows per process per micro-step
    grad_accum: int = 1
    lr: float = 1e-3  # LoRA stage (LoRA matrices and the new attention parameters)
    transfer_lr: float = 1e-2  # transfer stage (the new attention parameters only)
    medusa_lr: float = 1e-3
    draft_head: str | None = None  # "eagle": train an EAGLE draft head on the fine-tuned model (the last stage)
    draft_steps: int = _EAGLE.steps
    draft_lr: float = _EAGLE.lr
    draft_prompts: int = _EAGLE.prompts  # training-text windows the model continues greedily: the head's data
    draft_new_tokens: int = _EAGLE.new_tokens  # the model's continuation of each
    draft_text_windows: int = _EAGLE.text_windows  # more training-text windows, read teacher-forced (no generation)
    draft_vocab: int = _EAGLE.draft_vocab  # tokens the head may propose: the most frequent in its data (0: all)
    draft_shape_prompts: int = 8  # held-out prompts on which the head's tree is measured (0: not measured)
    warmup: float = 0.1  # fraction of each stage's steps with a linear warm-up (then cosine to 10%)
    max_grad_norm: float = 1.0  # 0: no clipping
    lora_rank: int = 8
    lora_alpha: float | None = None  # default 2 * rank
    lora_targets: str = "q,k,v,o"
    merge: bool = True
    eval_every: int = 0  # held-out perplexity every N steps (and at the start and each stage's end); 0: never
    eval_windows: int = 4
    eval_text: str | None = None  # None: the built-in held-out plays
    save_every: int = 0  # resume state every N steps (always also on Ctrl-C); 0: only on Ctrl-C
    gradient_checkpointing: bool = False
    dtype: str = "fp32"  # fp32, or bf16 / fp16 autocast (CUDA)
    seed: int = 0
    loss: str = "mix"  # LoRA stage: ce (next token), kl (distil the original's distribution) or mix (measured best off-domain)
    kl_temperature: float = 1.0
    mix_alpha: float = 0.5  # with loss "mix": alpha * CE + (1 - alpha) * KL
    text_mix: str = ""  # e.g. "selfgen:0.5": that share of the training tokens written by the original model itself

    def validate(self) -> FinetuneConfig:
        positive = ("seq_len", "batch_size", "grad_accum", "lora_rank", "eval_windows", "draft_prompts", "draft_new_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise LinconvError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        nonnegative = (
            "transfer_steps",
            "lora_steps",
            "medusa_heads",
            "medusa_steps",
            "draft_steps",
            "draft_vocab",
            "draft_text_windows",
            "draft_shape_prompts",
            "eval_every",
            "save_every",
        )
        for name in nonnegative:
            if getattr(self, name) < 0:
                raise LinconvError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "transfer_lr", "medusa_lr", "draft_lr"):
            if not 0 < getattr(self, name) < math.inf:  # nan and inf train NaN weights
                raise LinconvError(f"--{name.replace('_', '-')} must be > 0 and finite, got {getattr(self, name)}")
        if self.lora_alpha is not None and not 0 < self.lora_alpha < math.inf:
            raise LinconvError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.warmup < 1:
            raise LinconvError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.seq_len < 2:
            raise LinconvError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        if self.draft_head is not None and self.draft_head not in DRAFT_HEADS:
            raise LinconvError(f"unknown --draft-head {self.draft_head!r}; choose from: {', '.join(DRAFT_HEADS)}")
        if self.loss not in LOSSES:
            raise LinconvError(f"unknown --loss {self.loss!r}; choose from: {', '.join(LOSSES)}")
        if not 0 < self.kl_temperature < math.inf:
            raise LinconvError(f"--kl-temperature must be > 0 and finite, got {self.kl_temperature}")
        if not 0 <= self.mix_alpha <= 1:
            raise LinconvError(f"--mix-alpha is a weight in [0, 1], got {self.mix_alpha}")
        parse_text_mix(self.text_mix, (SELFGEN,))
        if self.dtype not in PRECISIONS:
            raise LinconvError(f"unknown --dtype {self.dtype!r}; choose from: fp32, bf16, fp16")
        if not self.stages():
            raise LinconvError(f"nothing to do: {', '.join(stage.idle for stage in STAGES)}")
        return self

    def stages(self) -> list[tuple[str, int]]:
        """The stages this run trains, in order, with their step counts."""
        return [(stage.name, steps) for stage, steps in planned(self)]

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> dict:
        """The options that decide what is trained: a resume must use the same ones."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_FINGERPRINTED}


@dataclass
class StageResult:
    name: str
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of every optimizer step
    seconds: float = 0.0  # this run only (a resumed run does not know the interrupted one's time)
    tokens: int = 0


@dataclass
class FinetuneResult:
    output: Path
    stages: list[StageResult]
    evals: list[dict]  # {"stage", "step", "perplexity"}; stage "start" = before training
    adapter: Path | None = None
    medusa: Path | None = None
    eagle: Path | None = None
