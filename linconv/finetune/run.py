"""One fine-tune run: check the inputs, load them, train the planned stages in order (continuing an
interrupted run where it stopped), and write the fine-tuned checkpoint with its card."""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoTokenizer

from linconv import selfgen
from linconv.checkpoint import check_output, linconv_config, load, save_checkpoint
from linconv.data import mix_windows, parse_text_mix, tokenize, windows
from linconv.errors import LinconvError
from linconv.finetune.card import finetune_card, read_card
from linconv.finetune.config import FinetuneConfig, FinetuneResult, StageResult
from linconv.finetune.data import WindowOrder, token_windows
from linconv.finetune.distributed import accelerator, barrier
from linconv.finetune.loop import Trainer
from linconv.finetune.resume import PROGRESS, ResumeState, load_optimizer, load_tensors, resume_folder
from linconv.finetune.stages import STAGES, Stage, planned
from linconv.models import position_limit
from linconv.models.hf import linconv_tensor_names
from linconv.progress import SILENT, Progress
from linconv.sources import check_safetensors


class Run:
    """One call of :func:`finetune`, in every process: refuses a resume that would not continue the same run."""

    def __init__(
        self,
        checkpoint: Path,
        output: Path,
        cfg: FinetuneConfig,
        resume: bool,
        overwrite: bool,
        device: str | torch.device | None,
        progress: Progress,
    ):
        self.checkpoint, self.output, self.cfg, self.progress = checkpoint, output, cfg, progress
        self.partial = resume_folder(output)
        self.overwrite = overwrite
        self.state = ResumeState.load(self.partial) if resume else None
        self.acc = accelerator(cfg, device)
        self.main = self.acc.is_main_process
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.plan = planned(cfg)
        if self.state is not None:
            self.state.check(self.partial, cfg.fingerprint(), self.world, checkpoint, {s.name: n for s, n in self.plan})
        self.stages: list[Stage] = []  # set up so far, in order
        self.touched: list[str] = []  # names of every tensor trained so far (the resume state)
        self.results: dict[str, StageResult] = {}

    def load(self) -> None:
        """Tokenizer, windows and model; the cheap checks first, so that mistakes fail before the weights load."""
        cfg = self.cfg
        config = _checkpoint_config(self.checkpoint)
        check_safetensors(self.checkpoint)
        limit = position_limit(config)
        if limit is not None and cfg.seq_len > limit:
            raise LinconvError(f"--seq-len {cfg.seq_len} is more than the {limit} positions of this model; use at most {limit}")
        saved = config.get("dtype") or config.get("torch_dtype") or "float32"
        self.save_dtype = getattr(torch, str(saved).removeprefix("torch."), torch.float32)
        for stage, _ in self.plan:
            stage.check(cfg, config["model_type"])
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
        except Exception:
            raise LinconvError(f"{self.checkpoint} has no usable tokenizer files; copy them from the source model") from None
        train = token_windows(self.tokenizer, cfg.text, "train", cfg.seq_len, "training")
        heldout = None
        if cfg.eval_every:
            heldout = token_windows(self.tokenizer, cfg.eval_text, "heldout", cfg.seq_len, "evaluation", cfg.eval_windows)
        if self.main:
            self.progress.message(f"loading {self.checkpoint}…")
        self.model, _ = load(self.checkpoint, dtype=torch.float32, device=self.acc.device)
        params = dict(self.model.named_parameters())
        self.new_params = [n for n in linconv_tensor_names(self.model) if n in params]
        self.model.requires_grad_(False)
        self.card = read_card(self.checkpoint)
        share = parse_text_mix(cfg.text_mix, (selfgen.SOURCE,)).get(selfgen.SOURCE, 0.0)
        if share:
            train = self._mix_own_text(train, share)
        order = WindowOrder(train, cfg.batch_size, cfg.grad_accum, cfg.seed, self.world, self.rank)
        evals = list(self.state.evals) if self.state is not None else []
        self.trainer = Trainer(self.acc, cfg, self.model, order, heldout, self.progress, self.partial, evals)

    def _mix_own_text(self, train: Tensor, share: float) -> Tensor:
        """``train`` windows mixed with text the original model writes itself (sampled once per base
        model and cached; the main process samples, the others read the cache)."""
        cfg = self.cfg
        tokens = own_text_tokens(cfg, share, sum(n for _, n in self.plan), self.world)
        gen = None
        if self.main:
            gen = selfgen.self_generated_text(self.model, self.tokenizer, selfgen.SelfGenConfig(tokens=tokens), progress=self.progress)
            self.progress.message(
                f"self-generated text: {gen.tokens:,} tokens in {gen.documents} documents, {gen.path} "
                f"({'sampled now in' if gen.new_tokens else 'cached; sampled in'} {gen.seconds:.0f} s)"
            )
        barrier(self.acc)
        if gen is None:
            gen = selfgen.self_generated_text(self.model, self.tokenizer, selfgen.SelfGenConfig(tokens=tokens))
        own = windows(tokenize(self.tokenizer, gen.text), cfg.seq_len)
        return mix_windows([(train, 1 - share), (own, share)], cfg.seed)

    def run(self) -> FinetuneResult:
        """Every planned stage in order; those finished before an interruption only rebuild their structure."""
        trainer, names = self.trainer, [s.name for s in STAGES]
        resume_at = names.index(self.state.stage) if self.state is not None else -1
        if trainer.heldout is not None and self.state is None:
            trainer.evaluate("start", 0)
        with trainer.interruptible():
            for kind, total in self.plan:
                idx = names.index(kind.name)
                stage = kind(self.model, self.cfg, self.new_params, self.output, self.tokenizer, self.progress if self.main else SILENT)
                self.stages.append(stage)
                trainable = stage.setup()
                self.touched += [n for n in [*dict(trainable), *stage.tensors()] if n not in self.touched]
                losses = list(self.state.losses.get(stage.name, [])) if self.state is not None else []
                result = self.results[stage.name] = StageResult(stage.name, total, losses)
                start = 0
                if idx == resume_at:
                    self._load_tensors()  # also holds every earlier stage's trained tensors
                    start = self.state.step
                if not trainable:
                    stage.teardown()
                    if self.main:
                        self.progress.message(
                            f"{stage.name}: this model has no trainable attention parameters (variant without any); skipped"
                        )
                    continue
                if idx >= resume_at and start < total:
                    resumed = load_optimizer(self.partial) if start > 0 else None
                    trainer.train(stage, total, start, result, resumed, functools.partial(self._save, stage.name))
                stage.teardown()
                if idx < resume_at:
                    continue  # trained before the interruption: its tensors come with the resume state
                done = any(e["stage"] == stage.name and e["step"] == total for e in trainer.evals)
                if trainer.heldout is not None and stage.evaluates and not done:
                    trainer.evaluate(stage.name, total)
                if (kind, total) != self.plan[-1]:
                    self._save(stage.name, total, None)
        return self._finish()

    def _tensors(self) -> dict[str, Tensor]:
        """Every tensor a stage may train: the model's parameters and those the stages keep outside it."""
        named = dict(self.model.named_parameters())
        for stage in self.stages:
            named.update(stage.tensors())
        return named

    def _save(self, stage: str, step: int, optimizer: dict | None) -> None:
        if self.main:
            losses = {s: r.losses for s, r in self.results.items()}
            state = ResumeState(stage, step, self.cfg.fingerprint(), self.world, str(self.checkpoint.resolve()), losses, self.trainer.evals)
            tensors = self._tensors()
            state.save(self.partial, {n: tensors[n] for n in self.touched}, optimizer)
        barrier(self.acc)

    def _load_tensors(self) -> None:
        state = load_tensors(self.partial)
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

    def _finish(self) -> FinetuneResult:
        """Write the checkpoint (main process): each stage's final model form, files and card entries."""
        if self.main:
            card = finetune_card(
                self.card,
                checkpoint=self.checkpoint,
                cfg=self.cfg,
                processes=self.world,
                results=list(self.results.values()),
                evals=self.trainer.evals,
                replaced=tuple(k for s in STAGES for k in s.card_keys),
                entries={k: v for s in self.stages for k, v in s.card().items()},
            )
            self.output.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".finetune-", dir=self.output.parent) as spare:
                scratch, plain = Path(spare), self.model
                for stage in self.stages:
                    plain = stage.finish(plain, scratch)
                if self.save_dtype != torch.float32:
                    plain.to(self.save_dtype)

                def extra(folder: Path) -> None:
                    for stage in self.stages:
                        stage.save(folder, scratch, self.save_dtype)

                save_checkpoint(plain, self.tokenizer, self.output, card=card, overwrite=self.overwrite, extra=extra)
            shutil.rmtree(self.partial, ignore_errors=True)
        barrier(self.acc)
        outputs = {k: v for s in self.stages for k, v in s.outputs().items()}
        return FinetuneResult(output=self.output, stages=list(self.results.values()), evals=self.trainer.evals, **outputs)


def _checkpoint_config(checkpoint: Path) -> dict:
    """config.json of a linconv checkpoint; anything else gets linconv.load's one-line explanation."""
    config = linconv_config(checkpoint)
    if config is None:
        load(checkpoint)  # raises the reason (no config.json, not a linconv checkpoint, ...)
        raise LinconvError(f"{checkpoint} is not a linconv checkpoint; convert it first with `linconv convert`")
    return config


def _check_paths(checkpoint: Path, output: Path, partial: Path, resume: bool, overwrite: bool) -> None:
    if not checkpoint.is_dir():
        raise LinconvError(f"checkpoint folder {checkpoint} does not exist")
    ck, out = checkpoint.resolve(), output.resolve()
    if out == ck or ck in out.parents:
        raise LinconvError(f"OUTPUT {output} is inside CHECKPOINT {checkpoint}; write the fine-tuned model to a folder outside it")
    if out in ck.parents:
        raise LinconvError(f"CHECKPOINT {checkpoint} is inside OUTPUT {output}; choose another OUTPUT")
    check_output(output, overwrite=overwrite)
    if resume and not (partial / PROGRESS).is_file():
        raise LinconvError(f"nothing to resume: no resume checkpoint at {partial} (one is written every --save-every steps and on Ctrl-C)")
    if not resume and partial.exists() and not overwrite:
        raise LinconvError(f"{partial} holds an interrupted run; pass --resume to continue it or --overwrite to start over")


def own_text_tokens(cfg: FinetuneConfig, share: float, steps: int, world: int = 1) -> int:
    """Self-generated tokens a run of ``steps`` optimizer steps reads at a ``share`` of its text (10% spare)."""
    return math.ceil(1.1 * share * steps * cfg.batch_size * cfg.grad_accum * world * cfg.seq_len)


def finetune(
    checkpoint: str | Path,
    output: str | Path,
    config: FinetuneConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Fine-tune the linconv checkpoint ``checkpoint`` into ``output`` (see :mod:`linconv.finetune`).

    ``resume`` continues the run interrupted in ``OUTPUT.partial``; Ctrl-C saves such a state and
    raises KeyboardInterrupt. ``device``: "cpu", "cuda" or None/"auto"; under ``accelerate launch``
    or ``torchrun`` every process runs this same call. ``progress`` hears of each stage's steps (its
    task is the stage's name; fields loss, lr, tok_s) and, as messages, of evaluations.
    """
    cfg = (config or FinetuneConfig()).validate()
    checkpoint, output = Path(checkpoint), Path(output)
    _check_paths(checkpoint, output, resume_folder(output), resume, overwrite)
    run = Run(checkpoint, output, cfg, resume, overwrite, device, progress or SILENT)
    if not resume and overwrite and run.partial.exists():
        if run.main:
            shutil.rmtree(run.partial)
        barrier(run.acc)
    run.load()
    return run.run()
