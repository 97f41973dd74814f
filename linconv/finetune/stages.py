"""The stages of fine-tuning, one class each, run in the order of :data:`STAGES`.

A stage says what it trains (:meth:`Stage.prepare` builds its structure and returns the trainable
tensors), its loss, its learning rate and step count (read from the config), whether held-out
perplexity is measured after it, how it is undone, and what it adds to the saved checkpoint. The
training loop, the resume state and the card know nothing else about it: adding a stage is adding a
class here and listing it in :data:`STAGES` (its options, if new, go into ``FinetuneConfig``).

1. :class:`Transfer` — attention transfer. Every converted layer computes its linear attention and
   the original softmax attention from the same q, k, v (``LinconvAttention.transfer``) and hands
   the softmax output on, so each layer learns against the original activations; the loss is the
   sum of the per-layer MSEs and only linconv's new attention parameters train.
2. :class:`LoRA` — peft LoRA on the chosen attention projections plus the new attention parameters
   (trained fully); causal-LM loss or distillation from the original model (``--loss``), computed
   from the last hidden state a chunk of logits at a time.
3. :class:`Medusa` — Medusa draft heads on the frozen (fine-tuned) model, loss = Σ over heads of CE.
4. :class:`Eagle` — an EAGLE draft head on the frozen (fine-tuned) model, trained on the model's own
   greedy continuations (``linconv.speculative.eagle_train``); its tree is measured at the end.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from linconv.attention.module import LinconvAttention
from linconv.finetune.data import WindowOrder, mix
from linconv.finetune.lora_targets import lora_projections, lora_target_modules
from linconv.loss import distill_loss, lm_loss, model_parts
from linconv.progress import SILENT, Progress
from linconv.speculative.drafts import MedusaDraft
from linconv.speculative.eagle import EAGLE_WEIGHTS, EagleDraft, EagleHead, save_eagle
from linconv.speculative.eagle_train import EagleTrainConfig, eagle_loss, eagle_setup, frequent_tokens
from linconv.speculative.files import store_tree
from linconv.speculative.medusa import MEDUSA_CONFIG, MEDUSA_WEIGHTS, MedusaHeads, medusa_loss, save_medusa
from linconv.speculative.shape import shape_tree, spread_windows

if TYPE_CHECKING:
    from linconv.finetune.config import FinetuneConfig

Trainable = list[tuple[str, nn.Parameter]]


class Stage:
    """One stage of a run, made for one model; a subclass fills in the class attributes and methods."""

    name: ClassVar[str]  # as in the resume state, the results and the progress bars
    steps_option: ClassVar[str]  # the FinetuneConfig field of its step count ...
    lr_option: ClassVar[str]  # ... and of its learning rate
    number: ClassVar[int]  # its own number in the seeds of its data order: fixed, so that results never depend on STAGES' order
    idle: ClassVar[str]  # what leaves it out of a run, for the "nothing to do" error
    evaluates: ClassVar[bool] = True  # held-out perplexity after it (False: it does not change the model)
    card_keys: ClassVar[tuple[str, ...]] = ()  # card entries it writes (an input checkpoint's are dropped)

    def __init__(
        self, model: nn.Module, cfg: FinetuneConfig, new_params: list[str], output: Path, tokenizer=None, progress: Progress = SILENT
    ):
        self.model, self.cfg, self.new_params, self.output = model, cfg, new_params, output
        self.tokenizer, self.progress = tokenizer, progress  # progress: SILENT outside the main process
        self.trainable: Trainable = []

    @classmethod
    def steps(cls, cfg: FinetuneConfig) -> int:
        """Its optimizer steps in a run with ``cfg`` (0: not run)."""
        return getattr(cfg, cls.steps_option)

    @classmethod
    def lr(cls, cfg: FinetuneConfig) -> float:
        return getattr(cfg, cls.lr_option)

    @classmethod
    def check(cls, cfg: FinetuneConfig, model_type: str) -> None:
        """Cheap checks before the weights load, so that mistakes fail early."""

    def setup(self) -> Trainable:
        """Freeze the model, build the stage's structure, and return its trainable tensors (named)."""
        self.model.requires_grad_(False)
        self.trainable = self.prepare()
        for _, p in self.trainable:
            p.requires_grad_(True)
        return self.trainable

    def prepare(self) -> Trainable:
        """Build the stage's structure (layers, heads) and set train/eval modes; its trainable tensors."""
        raise NotImplementedError

    def data(self, order: WindowOrder) -> WindowOrder:
        """Where its steps take their batches from, asked once before the first step this process
        trains (a resumed run has its tensors back by then): the run's text windows."""
        return order

    def step_tokens(self) -> int:
        """Tokens one process trains on in an optimizer step (for tokens/s), once :meth:`data` is known."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len

    def loss(self, ids: Tensor) -> Tensor:
        """The loss of a batch from :meth:`data`: windows ids [B, T] (a scalar to minimise)."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Undo what training needed (gradients, checkpointing); its structure stays for the later stages."""
        for _, p in self.trainable:
            p.requires_grad_(False)

    def tensors(self) -> dict[str, Tensor]:
        """Trained tensors that live outside the model (they go into the resume state under these names)."""
        return {}

    def finish(self, model: nn.Module, scratch: Path) -> nn.Module:
        """The model to save once the run is over (``scratch``: a temporary folder for what it must keep)."""
        return model

    def save(self, folder: Path, scratch: Path, dtype: torch.dtype) -> None:
        """Write its own files into the checkpoint ``folder`` being made (tensors in ``dtype``)."""

    def card(self) -> dict:
        """Entries for the model card, among :attr:`card_keys`."""
        return {}

    def outputs(self) -> dict:
        """``FinetuneResult`` fields it fills (paths in the output folder)."""
        return {}


class Transfer(Stage):
    name, number, idle = "transfer", 0, "--transfer-steps is 0"
    steps_option, lr_option = "transfer_steps", "transfer_lr"

    def prepare(self) -> Trainable:
        self.attns = [m for m in self.model.modules() if isinstance(m, LinconvAttention)]
        self.decoder, _ = model_parts(self.model)
        params = dict(self.model.named_parameters())
        self.model.eval()  # the teacher is the original model: no dropout
        return [(n, params[n]) for n in self.new_params]

    def loss(self, ids: Tensor) -> Tensor:
        for m in self.attns:
            m.transfer = True
        try:
            self.decoder(input_ids=ids, use_cache=False)
            return torch.stack([m.transfer_loss for m in self.attns]).sum()
        finally:
            for m in self.attns:
                m.transfer, m.transfer_loss = False, None


class LoRA(Stage):
    name, number, idle = "lora", 1, "--lora-steps is 0"
    steps_option, lr_option = "lora_steps", "lr"
    card_keys = ("adapter",)

    @classmethod
    def check(cls, cfg: FinetuneConfig, model_type: str) -> None:
        lora_projections(model_type, cfg.lora_targets)

    def prepare(self) -> Trainable:
        # peft is imported here, not at the top: it is only needed by this stage and costs ~0.7 s
        # on every start of the `linconv` command, which imports this package for FinetuneConfig
        from peft import LoraConfig, get_peft_model

        model, cfg = self.model, self.cfg
        targets = lora_target_modules(model, cfg.lora_targets)
        torch.manual_seed(mix(cfg.seed, self.number, -1))  # LoRA A init
        modules = dict(model.named_modules())
        lcfg = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
            lora_dropout=0.0,
            target_modules=targets,
            fan_in_fan_out=isinstance(modules[targets[0]], Conv1D),
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers alias
            self.peft = get_peft_model(model, lcfg)
        self.peft.peft_config["default"].base_model_name_or_path = str(self.output)
        params = dict(model.named_parameters())
        trainable = [(n, p) for n, p in params.items() if p.requires_grad] + [(n, params[n]) for n in self.new_params]
        if cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return trainable

    def loss(self, ids: Tensor) -> Tensor:
        """Next-token CE, or distillation from the original model (the same weights with softmax
        attention and the adapters off): KL, or alpha * CE + (1 - alpha) * KL."""
        cfg = self.cfg
        if cfg.loss == "ce":
            return lm_loss(self.model, ids)
        return distill_loss(self.model, ids, temperature=cfg.kl_temperature, alpha=cfg.mix_alpha if cfg.loss == "mix" else 0.0)

    def teardown(self) -> None:
        super().teardown()
        if self.cfg.gradient_checkpointing:
            m = self.model
            (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()

    def finish(self, model: nn.Module, scratch: Path) -> nn.Module:
        """Merged into the weights, or (``merge=False``) unloaded with the adapter kept in ``scratch``."""
        if self.cfg.merge:
            return self.peft.merge_and_unload()
        self.peft.save_pretrained(scratch / self.name, save_embedding_layers=False)
        return self.peft.unload()

    def save(self, folder: Path, scratch: Path, dtype: torch.dtype) -> None:
        if not self.cfg.merge:
            shutil.copytree(scratch / self.name, folder / "adapter")

    def card(self) -> dict:
        return {} if self.cfg.merge else {"adapter": "adapter/ (peft LoRA, not merged)"}

    def outputs(self) -> dict:
        return {} if self.cfg.merge else {"adapter": self.output / "adapter"}


SHAPE_TOKENS, SHAPE_DEPTH = 64, 6  # prompt and continuation tokens per tree-shape prompt; EAGLE depths measured


def measure_tree(stage: Stage, model: nn.Module, draft, what: str, depth: int) -> dict | None:
    """The draft's best static tree against ``model``, measured on ``--draft-shape-prompts`` held-out
    Britannica prompts on this device (None when that option is 0: the draft keeps its default tree)."""
    n = stage.cfg.draft_shape_prompts
    if not n:
        return None
    stage.progress.message(f"measuring the {what} tree on {n} held-out prompt{'s' * (n > 1)}…")
    prompts = spread_windows(stage.tokenizer, None, "britannica", n, SHAPE_TOKENS)
    return shape_tree(model, draft, prompts, new_tokens=SHAPE_TOKENS, depth=depth).to_dict()


class Medusa(Stage):
    name, number, idle = "medusa", 2, "there are no --medusa-heads"
    steps_option, lr_option = "medusa_steps", "medusa_lr"
    evaluates = False  # the heads do not change the model's own predictions
    card_keys = ("medusa_heads",)

    @classmethod
    def steps(cls, cfg: FinetuneConfig) -> int:
        return super().steps(cfg) if cfg.medusa_heads else 0

    def prepare(self) -> Trainable:
        self.heads = MedusaHeads.for_model(self.model, self.cfg.medusa_heads)
        self.tree = None
        self.decoder, _ = model_parts(self.model)
        self.model.eval()
        self.heads.train()
        return list(self.tensors().items())

    def loss(self, ids: Tensor) -> Tensor:
        with torch.no_grad():
            hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
        return medusa_loss(self.heads, hidden, ids)

    def tensors(self) -> dict[str, Tensor]:
        return {f"medusa.{n}": p for n, p in self.heads.named_parameters()}

    def finish(self, model: nn.Module, scratch: Path) -> nn.Module:
        """Measure the heads' best tree against ``model`` as it will be saved (main process)."""
        self.heads.eval()
        draft = MedusaDraft(self.heads.attach(model), [1] * self.cfg.medusa_heads)
        self.tree = measure_tree(self, model, draft, "Medusa heads'", depth=self.cfg.medusa_heads)
        return model

    def save(self, folder: Path, scratch: Path, dtype: torch.dtype) -> None:
        save_medusa(self.heads.to(dtype), folder)
        if self.tree:
            store_tree(folder, MEDUSA_CONFIG, self.tree)

    def card(self) -> dict:
        return {"medusa_heads": self.cfg.medusa_heads}

    def outputs(self) -> dict:
        return {"medusa": self.output / MEDUSA_WEIGHTS}


class Eagle(Stage):
    """An EAGLE draft head (``--draft-head eagle``) on the frozen model as fine-tuned so far.

    Its batches are rows of distilled data — the model's own greedy continuations of
    ``--draft-prompts`` windows of the training text, with its features and top-K tokens — made in
    :meth:`data`, when the model is final (after a resume too); the rows' order follows the run's
    seed like the windows'. At the end the tree is measured on held-out Britannica prompts
    (``--draft-shape-prompts``; 0 keeps the head's default tree) and stored in eagle.json.
    """

    name, number, idle = "eagle", 3, "there is no --draft-head"
    steps_option, lr_option = "draft_steps", "draft_lr"
    evaluates = False  # the head does not change the model's own predictions
    card_keys = ("draft_head",)

    @classmethod
    def steps(cls, cfg: FinetuneConfig) -> int:
        return super().steps(cfg) if cfg.draft_head == "eagle" else 0

    def prepare(self) -> Trainable:
        cfg = self.cfg
        self.train_cfg = EagleTrainConfig(
            text=cfg.text,
            prompts=cfg.draft_prompts,
            new_tokens=cfg.draft_new_tokens,
            text_windows=cfg.draft_text_windows,
            draft_vocab=cfg.draft_vocab,
            steps=cfg.draft_steps,
            lr=cfg.draft_lr,
            seed=cfg.seed,
        )
        self.distilled, self.tree = None, None
        self.model.eval()
        torch.manual_seed(mix(cfg.seed, self.number, -1))  # the head's fc init
        self.head = EagleHead.for_model(self.model)
        # the draft vocabulary comes with the distilled data (data()); until then a placeholder of its
        # size, which a resume state saved after the last step fills in
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.head.set_vocab(frequent_tokens(torch.zeros(1, dtype=torch.long), vocab_size, self.train_cfg.draft_vocab))
        self.head.train()
        return [(f"eagle.{n}", p) for n, p in self.head.named_parameters()]

    def data(self, order: WindowOrder) -> WindowOrder:
        """Distil the model's continuations (and set the head's draft vocabulary); batches are row indices."""
        _, self.distilled = eagle_setup(self.model, self.tokenizer, self.train_cfg, head=self.head, progress=self.progress)
        rows = torch.arange(len(self.distilled))
        return WindowOrder(rows, self.train_cfg.batch_size, order.grad_accum, order.seed, order.world, order.rank)

    def step_tokens(self) -> int:
        return self.train_cfg.batch_size * self.cfg.grad_accum * self.distilled.ids.shape[1]

    def loss(self, rows: Tensor) -> Tensor:
        return eagle_loss(self.head, self.distilled.rows(rows), self.train_cfg.ce_weight, self.train_cfg.noise)[0]

    def teardown(self) -> None:
        super().teardown()
        self.head.eval()
        self.distilled = None  # [N, T, D] features: not needed any more

    def tensors(self) -> dict[str, Tensor]:
        """Its parameters and its draft vocabulary (a run resumed after the last step distils nothing)."""
        named = {f"eagle.{n}": p for n, p in self.head.named_parameters()}
        if self.head.vocab is not None:
            named["eagle.vocab"] = self.head.vocab
        return named

    def finish(self, model: nn.Module, scratch: Path) -> nn.Module:
        """Measure the head's best tree against ``model`` as it will be saved (main process)."""
        self.tree = measure_tree(self, model, EagleDraft(self.head.attach(model)), "EAGLE head's", depth=SHAPE_DEPTH)
        return model

    def save(self, folder: Path, scratch: Path, dtype: torch.dtype) -> None:
        extra = {"training": asdict(self.train_cfg), **({"tree": self.tree} if self.tree else {})}
        save_eagle(self.head.to(dtype), folder, extra=extra)

    def card(self) -> dict:
        return {"draft_head": "eagle"}

    def outputs(self) -> dict:
        return {"eagle": self.output / EAGLE_WEIGHTS}


STAGES: tuple[type[Stage], ...] = (Transfer, LoRA, Medusa, Eagle)
"""Every stage, in the order a run trains them."""


def planned(cfg: FinetuneConfig) -> list[tuple[type[Stage], int]]:
    """The stages a run with ``cfg`` trains, in order, with their step counts."""
    return [(stage, stage.steps(cfg)) for stage in STAGES if stage.steps(cfg) > 0]
