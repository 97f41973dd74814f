"""Fine-tuning a linearized model back toward the original: attention transfer, LoRA, Medusa heads.

Stages, each optional, in this order:

1. ``transfer`` — attention transfer. Every converted layer computes its linear attention and the
   original softmax attention from the same q, k, v (``LinconvAttention.transfer``) and hands the
   softmax output on, so each layer learns against the original activations; the loss is the sum of
   the per-layer MSEs and only linconv's new attention parameters train.
2. ``lora`` — peft LoRA on the chosen attention projections plus the new attention parameters
   (trained fully), causal-LM loss computed from the last hidden state a chunk of logits at a time.
3. ``medusa`` — Medusa draft heads on the frozen (fine-tuned) model, loss = Σ over heads of CE.

Data parallel without a DDP wrapper: every process takes its own windows of each step, and the
gradients of the (small) trainable set are averaged with one all-reduce per optimizer step. So any
submodule can be called directly (the decoder without its output head) and the same code runs in one
process or under ``accelerate launch`` / ``torchrun`` (gloo on CPU, nccl on CUDA).

Determinism: the windows of step s of a stage are a function of (seed, stage, s) — an epoch-wise
seeded permutation — and the RNG is reseeded from (seed, stage, s, rank) at every step. A resume
state (``OUTPUT.partial/``: trainable tensors, optimizer, scheduler, grad scaler, stage, step) thus
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from linconv.checkpoint import check_output
from linconv.errors import LinconvError
from linconv.loss import lm_loss, model_parts
from linconv.models import position_limit
from linconv.sources import check_safetensors

STAGES = ("transfer", "lora", "medusa")
PRECISIONS = {"fp32": "no", "float32": "no", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}
# options that do not change what is trained: they may differ between a run and its resume
_NOT_FINGERPRINTED = {"eval_every", "eval_windows", "eval_text", "save_every", "merge", "gradient_checkpointing"}


@dataclass
class FinetuneConfig:
    """Everything a fine-tune run needs besides its input and output folders."""

    text: str | None = None  # training text: None (built-in train split), file, folder or datasets name
    transfer_steps: int = 20  # the measured default recipe (README, "Which variant")
    lora_steps: int = 60
    medusa_heads: int = 0
    medusa_steps: int = 100
    seq_len: int = 512
    batch_size: int = 1  # windows per process per micro-step
    grad_accum: int = 1
    lr: float = 1e-3  # LoRA stage (LoRA matrices and the new attention parameters)
    transfer_lr: float = 1e-2  # transfer stage (the new attention parameters only)
    medusa_lr: float = 1e-3
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

    def validate(self) -> FinetuneConfig:
        positive = ("seq_len", "batch_size", "grad_accum", "lora_rank", "eval_windows")
        for name in positive:
            if getattr(self, name) <= 0:
                raise LinconvError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("transfer_steps", "lora_steps", "medusa_heads", "medusa_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise LinconvError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "transfer_lr", "medusa_lr"):
            if not 0 < getattr(self, name) < math.inf:  # nan and inf train NaN weights
                raise LinconvError(f"--{name.replace('_', '-')} must be > 0 and finite, got {getattr(self, name)}")
        if self.lora_alpha is not None and not 0 < self.lora_alpha < math.inf:
            raise LinconvError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.warmup < 1:
            raise LinconvError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.seq_len < 2:
            raise LinconvError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        if self.dtype not in PRECISIONS:
            raise LinconvError(f"unknown --dtype {self.dtype!r}; choose from: fp32, bf16, fp16")
        if not self.stages():
            raise LinconvError("nothing to do: --transfer-steps and --lora-steps are 0 and there are no --medusa-heads")
        return self

    def stages(self) -> list[tuple[str, int]]:
        """The stages this run trains, with their step counts."""
        steps = {"transfer": self.transfer_steps, "lora": self.lora_steps, "medusa": self.medusa_steps if self.medusa_heads else 0}
        return [(s, steps[s]) for s in STAGES if steps[s] > 0]

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> dict:
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


class Reporter:
    """How a run tells its caller what happens (main process only). The default says nothing."""

    def stage_start(self, stage: str, total: int, done: int) -> None: ...

    def step(self, stage: str, step: int, loss: float, lr: float, tokens_per_s: float) -> None: ...

    def evaluated(self, stage: str, step: int, perplexity: float) -> None: ...

    def stage_end(self, stage: str) -> None: ...

    def message(self, text: str) -> None: ...


# ---------------------------------------------------------------------------------------------
# losses and evaluation


# ---------------------------------------------------------------------------------------------
# LoRA targets, data, paths


def lora_projections(model_type: str, targets: str) -> list[str]:
    """The projection names meant by ``targets`` ("q,k,v,o" or the architecture's own names).

    Llama-like models map q,k,v,o to q_proj,k_proj,v_proj,o_proj; GPT-2 maps q,k,v to its fused
    c_attn and o to c_proj. An unknown target is a LinconvError listing the valid ones.
    """
    from linconv.models import get_adapter

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
    from linconv.models import get_adapter

    adapter = get_adapter(model.config.model_type)
    chosen = lora_projections(model.config.model_type, targets)
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names[id(getattr(b, adapter.attn_name))]}.{p}" for b in adapter.blocks(model) for p in chosen]


def _token_windows(tokenizer, spec: str | None, split: str, seq_len: int, what: str, max_windows: int | None = None) -> Tensor:
    from linconv.data import load_text, tokenize, windows

    text = load_text(spec, split=split)
    if max_windows is not None:  # tokenize a generous prefix only
        text = text[: max_windows * seq_len * 32]
    old = tokenizer.model_max_length
    tokenizer.model_max_length = 1 << 62  # one long text on purpose: silence the "too long" warning
    try:
        tokens = tokenize(tokenizer, text)
    finally:
        tokenizer.model_max_length = old
    if tokens.numel() < seq_len:
        raise LinconvError(
            f"the {what} text has {tokens.numel()} tokens, fewer than one "
            f"--seq-len window of {seq_len}; use more text or a shorter --seq-len"
        )
    return windows(tokens, seq_len, None if max_windows is None else max_windows * seq_len)


def _checkpoint_config(checkpoint: Path) -> dict:
    """config.json of a linconv checkpoint; anything else gets linconv.load's one-line explanation."""
    from linconv.checkpoint import load

    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or not str(config.get("model_type", "")).startswith("linconv-"):
        load(checkpoint)  # raises the reason (no config.json, not a linconv checkpoint, ...)
        raise LinconvError(f"{checkpoint} is not a linconv checkpoint; convert it first with `linconv convert`")
    return config


def resume_folder(output: str | Path) -> Path:
    """Where a run writing ``output`` keeps its resume state: ``OUTPUT.partial`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


def _check_paths(checkpoint: Path, output: Path, partial: Path, resume: bool, overwrite: bool) -> None:
    if not checkpoint.is_dir():
        raise LinconvError(f"checkpoint folder {checkpoint} does not exist")
    ck, out = checkpoint.resolve(), output.resolve()
    if out == ck or ck in out.parents:
        raise LinconvError(f"OUTPUT {output} is inside CHECKPOINT {checkpoint}; write the fine-tuned model to a folder outside it")
    if out in ck.parents:
        raise LinconvError(f"CHECKPOINT {checkpoint} is inside OUTPUT {output}; choose another OUTPUT")
    check_output(output, overwrite=overwrite)
    if resume and not (partial / "progress.json").is_file():
        raise LinconvError(f"nothing to resume: no resume checkpoint at {partial} (one is written every --save-every steps and on Ctrl-C)")
    if not resume and partial.exists() and not overwrite:
        raise LinconvError(f"{partial} holds an interrupted run; pass --resume to continue it or --overwrite to start over")


def _mix(*xs: int) -> int:
    h = 0x5EED
    for x in xs:
        h = (h * 1_000_003 + int(x)) % (2**61 - 1)
    return h


def _schedule(total: int, warmup: float) -> Callable[[int], float]:
    w = int(total * warmup)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / (w + 1)
        progress = (step - w) / max(1, total - w)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---------------------------------------------------------------------------------------------
# the run


class _Run:
    def __init__(self, checkpoint: Path, output: Path, cfg: FinetuneConfig, resume: bool, overwrite: bool, device, reporter: Reporter):
        self.checkpoint, self.output, self.cfg, self.reporter = checkpoint, output, cfg, reporter
        self.partial = resume_folder(output)
        self.overwrite = overwrite
        self.stop = False
        self.progress = json.loads((self.partial / "progress.json").read_text()) if resume else None
        self.acc = _accelerator(cfg, device)
        self.main = self.acc.is_main_process
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if self.progress is not None:
            self._check_resume()
        self.peft = None
        self.heads = None
        self.touched: list[str] = []  # names of every tensor trained so far (the resume state)
        self.evals: list[dict] = list(self.progress["evals"]) if self.progress else []
        self.results: dict[str, StageResult] = {}
        self._perm: tuple = (None, None)  # (stage, epoch) -> that epoch's window order

    # -- setup ------------------------------------------------------------------------------

    def load(self) -> None:
        from transformers import AutoTokenizer

        from linconv.checkpoint import load
        from linconv.models.hf import linconv_tensor_names

        cfg = self.cfg
        # cheap checks first, so that mistakes fail before the weights load
        config = _checkpoint_config(self.checkpoint)
        check_safetensors(self.checkpoint)
        limit = position_limit(config)
        if limit is not None and cfg.seq_len > limit:
            raise LinconvError(f"--seq-len {cfg.seq_len} is more than the {limit} positions of this model; use at most {limit}")
        saved = config.get("dtype") or config.get("torch_dtype") or "float32"
        self.save_dtype = getattr(torch, str(saved).removeprefix("torch."), torch.float32)
        if cfg.lora_steps:
            lora_projections(config["model_type"], cfg.lora_targets)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
        except Exception:
            raise LinconvError(f"{self.checkpoint} has no usable tokenizer files; copy them from the source model") from None
        self.train = _token_windows(self.tokenizer, cfg.text, "train", cfg.seq_len, "training")
        self.eval = None
        if cfg.eval_every:
            self.eval = _token_windows(self.tokenizer, cfg.eval_text, "heldout", cfg.seq_len, "evaluation", cfg.eval_windows)
        if self.main:
            self.reporter.message(f"loading {self.checkpoint}…")
        self.model, _ = load(self.checkpoint, dtype=torch.float32, device=self.acc.device)
        params = dict(self.model.named_parameters())
        self.new_params = [n for n in linconv_tensor_names(self.model) if n in params]
        self.lora_names = lora_target_modules(self.model, cfg.lora_targets) if cfg.lora_steps else []
        self.model.requires_grad_(False)
        self.card = {}
        card_file = self.checkpoint / "linconv.json"
        if card_file.is_file():
            with suppress(OSError, ValueError):
                self.card = json.loads(card_file.read_text())

    def _check_resume(self) -> None:
        p = self.progress
        saved, now = p.get("config", {}), self.cfg.fingerprint()
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            listed = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now[k]!r})" for k in diff)
            raise LinconvError(f"{self.partial} was made with other settings: {listed}; resume with the same settings")
        if p.get("world_size") != self.world:
            raise LinconvError(
                f"{self.partial} was made with {p.get('world_size')} processes, this run has {self.world}; resume with the same number"
            )

    def _stage_setup(self, stage: str) -> tuple[list[tuple[str, Tensor]], Callable[[Tensor], Tensor]]:
        """Make ``stage``'s structure (LoRA layers, heads); returns its trainable tensors and loss."""
        model, cfg = self.model, self.cfg
        model.requires_grad_(False)
        if stage == "transfer":
            from linconv.attention.module import LinconvAttention

            attns = [m for m in model.modules() if isinstance(m, LinconvAttention)]
            decoder, _ = model_parts(model)
            params = dict(model.named_parameters())
            names = self.new_params

            def loss(ids: Tensor) -> Tensor:
                for m in attns:
                    m.transfer = True
                try:
                    decoder(input_ids=ids, use_cache=False)
                    return torch.stack([m.transfer_loss for m in attns]).sum()
                finally:
                    for m in attns:
                        m.transfer, m.transfer_loss = False, None

            model.eval()  # the teacher is the original model: no dropout
            trainable = [(n, params[n]) for n in names]
        elif stage == "lora":
            from peft import LoraConfig, get_peft_model
            from transformers.pytorch_utils import Conv1D

            torch.manual_seed(_mix(cfg.seed, 1, -1))  # LoRA A init
            modules = dict(model.named_modules())
            lcfg = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                lora_dropout=0.0,
                target_modules=self.lora_names,
                fan_in_fan_out=isinstance(modules[self.lora_names[0]], Conv1D),
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

            def loss(ids: Tensor) -> Tensor:
                return lm_loss(model, ids)

        else:
            from linconv.speculative.medusa import MedusaHeads, medusa_loss

            self.heads = MedusaHeads.for_model(model, cfg.medusa_heads)
            decoder, _ = model_parts(model)
            model.eval()
            self.heads.train()
            trainable = [(f"medusa.{n}", p) for n, p in self.heads.named_parameters()]

            def loss(ids: Tensor) -> Tensor:
                with torch.no_grad():
                    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
                return medusa_loss(self.heads, hidden, ids)

        for _, p in trainable:
            p.requires_grad_(True)
        self.touched += [n for n, _ in trainable if n not in self.touched]
        return trainable, loss

    def _tensors(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        if self.heads is not None:
            named.update({f"medusa.{n}": p for n, p in self.heads.named_parameters()})
        return named

    # -- data -------------------------------------------------------------------------------

    def _batch(self, stage_idx: int, step: int, micro: int) -> Tensor:
        cfg, n = self.cfg, self.train.shape[0]
        per_step = cfg.batch_size * cfg.grad_accum * self.world
        start = step * per_step + (micro * self.world + self.rank) * cfg.batch_size
        rows = []
        for pos in range(start, start + cfg.batch_size):
            epoch, i = divmod(pos, n)
            if self._perm[0] != (stage_idx, epoch):
                g = torch.Generator().manual_seed(_mix(cfg.seed, stage_idx, epoch))
                self._perm = ((stage_idx, epoch), torch.randperm(n, generator=g))
            rows.append(int(self._perm[1][i]))
        return self.train[rows].to(self.acc.device)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> FinetuneResult:
        stages = self.cfg.stages()
        resume_at = STAGES.index(self.progress["stage"]) if self.progress else -1
        if self.eval is not None and self.progress is None:
            self._evaluate("start", 0)
        with self._interruptible():
            for stage, total in stages:
                idx = STAGES.index(stage)
                trainable, loss = self._stage_setup(stage)
                losses = list(self.progress["losses"].get(stage, [])) if self.progress else []
                self.results[stage] = StageResult(stage, total, losses)
                start = 0
                if idx == resume_at:
                    self._load_state()  # also holds every earlier stage's trained tensors
                    start = self.progress["step"]
                if not trainable:
                    if self.main:
                        self.reporter.message(f"{stage}: this model has no trainable attention parameters (variant without any); skipped")
                    continue
                if idx >= resume_at and start < total:
                    self._train(stage, idx, total, start, trainable, loss)
                for _, p in trainable:
                    p.requires_grad_(False)
                if stage == "lora" and self.cfg.gradient_checkpointing:
                    m = self.model
                    (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()
                if idx < resume_at:
                    continue  # trained before the interruption: its tensors come with the resume state
                if self.eval is not None and stage != "medusa" and not any(e["stage"] == stage and e["step"] == total for e in self.evals):
                    self._evaluate(stage, total)
                if (stage, total) != stages[-1]:
                    self._save_state(stage, total, None, None)
        return self._finish()

    def _train(self, stage: str, idx: int, total: int, start: int, trainable, loss_fn) -> None:
        cfg, acc = self.cfg, self.acc
        lr = {"transfer": cfg.transfer_lr, "lora": cfg.lr, "medusa": cfg.medusa_lr}[stage]
        params = [p for _, p in trainable]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, cfg.warmup))
        optimizer = acc.prepare_optimizer(optimizer)
        if start > 0:
            state = torch.load(self.partial / "optimizer.pt", map_location=acc.device, weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if acc.scaler is not None and state.get("scaler"):
                acc.scaler.load_state_dict(state["scaler"])
        result = self.results[stage]
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.world * cfg.seq_len
        if self.main:
            self.reporter.stage_start(stage, total, start)
        for step in range(start, total):
            torch.manual_seed(_mix(cfg.seed, idx, step, self.rank))
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=acc.device)
            for micro in range(cfg.grad_accum):
                ids = self._batch(idx, step, micro)
                with acc.autocast():
                    loss = loss_fn(ids)
                acc.backward(loss / cfg.grad_accum)
                loss_sum += loss.detach().float()
            mean_loss, stop = self._all_reduce(params, loss_sum / cfg.grad_accum)
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            seconds = time.perf_counter() - t0
            result.losses.append(mean_loss)
            result.seconds += seconds
            result.tokens += tokens_per_step
            if self.main:
                self.reporter.step(stage, done, mean_loss, scheduler.get_last_lr()[0], tokens_per_step / seconds)
            if self.eval is not None and done % cfg.eval_every == 0 and done < total:
                self._evaluate(stage, done)
            if self.world == 1:
                stop = self.stop  # a Ctrl-C during this step (several processes agree on it in the next all-reduce)
            if stop or (cfg.save_every and done % cfg.save_every == 0 and done < total):
                self._save_state(stage, done, optimizer, scheduler)
            if stop:
                if self.main:
                    self.reporter.message(
                        f"interrupted after step {done} of {stage}; resume state saved in {self.partial} (continue with --resume)"
                    )
                raise KeyboardInterrupt
        if self.main:
            self.reporter.stage_end(stage)

    def _all_reduce(self, params: list[Tensor], loss: Tensor) -> tuple[float, bool]:
        """Average gradients and loss over processes; any process's stop request stops all."""
        if self.world == 1:
            return loss.item(), self.stop
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.reshape(1).float(), loss.new_tensor([float(self.stop)])])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).div_(self.world).to(g.dtype)
            offset += g.numel()
        return flat[-2].item() / self.world, flat[-1].item() > 0

    def _evaluate(self, stage: str, step: int) -> None:
        if self.main:
            from linconv.attention.module import LinconvAttention
            from linconv.bench.perplexity import perplexity

            modules = [self.model, *([self.heads] if self.heads is not None else [])]
            modes = [m.training for m in modules]
            self.model.eval()
            assert not any(isinstance(m, LinconvAttention) and m.transfer for m in self.model.modules())
            with self.acc.autocast():
                ppl = perplexity(self.model, self.eval.flatten(), window=self.cfg.seq_len, batch_size=self.cfg.batch_size).perplexity
            for m, mode in zip(modules, modes):
                m.train(mode)
            self.evals.append({"stage": stage, "step": step, "perplexity": ppl})
            self.reporter.evaluated(stage, step, ppl)
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    # -- resume state -----------------------------------------------------------------------

    def _save_state(self, stage: str, step: int, optimizer, scheduler) -> None:
        from linconv.checkpoint import atomic_folder

        if self.main:
            tensors = self._tensors()
            with atomic_folder(self.partial, overwrite=True) as tmp:
                save_file({n: tensors[n].detach().to("cpu").clone() for n in self.touched}, str(tmp / "trainable.safetensors"))
                if optimizer is not None:
                    scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
                    torch.save(
                        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler}, tmp / "optimizer.pt"
                    )
                progress = {
                    "stage": stage,
                    "step": step,
                    "config": self.cfg.fingerprint(),
                    "world_size": self.world,
                    "checkpoint": str(self.checkpoint),
                    "losses": {s: r.losses for s, r in self.results.items()},
                    "evals": self.evals,
                }
                (tmp / "progress.json").write_text(json.dumps(progress, indent=1) + "\n")
        self._barrier()

    def _load_state(self) -> None:
        try:
            state = load_file(str(self.partial / "trainable.safetensors"))
        except Exception as e:
            raise LinconvError(f"cannot read the resume state in {self.partial}: {str(e).splitlines()[0]}") from None
        tensors = self._tensors()
        missing = sorted(set(state) - set(tensors))
        if missing:
            raise LinconvError(
                f"the resume state in {self.partial} does not fit this model (e.g. {missing[0]}); was it made from another checkpoint?"
            )
        with torch.no_grad():
            for n, t in state.items():
                tensors[n].copy_(t)
        self.touched += [n for n in state if n not in self.touched]

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Ctrl-C (or SIGTERM) asks to stop after the current step, saving a resume state; twice aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True
            if self.main:
                self.reporter.message("stopping after this step to save a resume state (Ctrl-C again to abort at once)")

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- the result -------------------------------------------------------------------------

    def _finish(self) -> FinetuneResult:
        import linconv
        from linconv.checkpoint import save_checkpoint
        from linconv.speculative.medusa import MEDUSA_WEIGHTS, save_medusa

        cfg = self.cfg
        adapter = self.output / "adapter" if self.peft is not None and not cfg.merge else None
        if self.main:
            card = {k: v for k, v in self.card.items() if k not in ("made_by", "date", "adapter", "medusa_heads")}
            if "finetune" in card:  # fine-tuning a fine-tuned checkpoint: keep the earlier runs
                earlier = {"finetuned_from": card.pop("finetuned_from", None), **card.pop("finetune")}
                if "heldout_perplexity" in card:
                    earlier["heldout_perplexity"] = card.pop("heldout_perplexity")
                card["earlier_finetunes"] = [*card.get("earlier_finetunes", []), earlier]
            card.update(
                {
                    "made_by": f"linconv {linconv.__version__} finetune",
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "finetuned_from": str(self.checkpoint),
                    "finetune": {
                        **cfg.to_dict(),
                        "processes": self.world,
                        "final_loss": {s: r.losses[-1] for s, r in self.results.items() if r.losses},
                    },
                }
            )
            if self.evals:
                card["heldout_perplexity"] = [f"{e['stage']}@{e['step']}: {e['perplexity']:.3f}" for e in self.evals]
            if adapter is not None:
                card["adapter"] = "adapter/ (peft LoRA, not merged)"
            if self.heads is not None:
                card["medusa_heads"] = cfg.medusa_heads
            self.output.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".adapter-", dir=self.output.parent) as spare:
                plain = self.model
                if self.peft is not None:
                    if adapter is not None:
                        self.peft.save_pretrained(spare, save_embedding_layers=False)
                        plain = self.peft.unload()
                    else:
                        plain = self.peft.merge_and_unload()
                if self.save_dtype != torch.float32:
                    plain.to(self.save_dtype)
                if self.heads is not None:
                    self.heads.to(self.save_dtype)

                def extra(folder: Path) -> None:
                    if adapter is not None:
                        shutil.copytree(spare, folder / "adapter")
                    if self.heads is not None:
                        save_medusa(self.heads, folder)

                save_checkpoint(plain, self.tokenizer, self.output, card=card, overwrite=self.overwrite, extra=extra)
            shutil.rmtree(self.partial, ignore_errors=True)
        self._barrier()
        return FinetuneResult(
            output=self.output,
            stages=list(self.results.values()),
            evals=self.evals,
            adapter=adapter,
            medusa=self.output / MEDUSA_WEIGHTS if self.heads is not None else None,
        )


def _accelerator(cfg: FinetuneConfig, device):
    from accelerate import Accelerator

    name = str(device) if device is not None else "auto"
    cuda = torch.cuda.is_available() if name == "auto" else name.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise LinconvError("--device cuda requested but no CUDA device is available")
    if name.startswith("cuda:"):
        torch.cuda.set_device(torch.device(name))
    precision = PRECISIONS[cfg.dtype]
    if precision != "no" and not cuda:
        raise LinconvError(f"--dtype {cfg.dtype} (autocast) needs a CUDA device; on CPU train in fp32")
    return Accelerator(cpu=not cuda, mixed_precision=precision)


def finetune(
    checkpoint: str | Path,
    output: str | Path,
    config: FinetuneConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    reporter: Reporter | None = None,
) -> FinetuneResult:
    """Fine-tune the linconv checkpoint ``checkpoint`` into ``output`` (see the module docstring).

    ``resume`` continues the run interrupted in ``OUTPUT.partial``; Ctrl-C saves such a state and
    raises KeyboardInterrupt. ``device``: "cpu", "cuda" or None/"auto"; under ``accelerate launch``
    or ``torchrun`` every process runs this same call.
    """
    cfg = (config or FinetuneConfig()).validate()
    checkpoint, output = Path(checkpoint), Path(output)
    _check_paths(checkpoint, output, resume_folder(output), resume, overwrite)
    run = _Run(checkpoint, output, cfg, resume, overwrite, device, reporter or Reporter())
    if not resume and overwrite and run.partial.exists():
        if run.main:
            shutil.rmtree(run.partial)
        run._barrier()
    run.load()
    return run.run()


__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "Reporter",
    "StageResult",
    "finetune",
    "lora_projections",
    "lora_target_modules",
    "resume_folder",
]
