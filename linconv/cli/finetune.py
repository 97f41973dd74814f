"""``linconv finetune``: attention transfer, then LoRA, then optional Medusa heads; resumable."""

from __future__ import annotations

import time

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from linconv.cli.common import console, friendly
from linconv.finetune import FinetuneConfig, Reporter
from linconv.recipes import DEFAULT_RECIPE, get_recipe, recipe_help

_D = FinetuneConfig()


class RichReporter(Reporter):
    """A progress bar per stage with loss, tokens/s and ETA; evaluations printed above it."""

    def __init__(self):
        self.progress = self._new_progress()
        self.tasks: dict[str, int] = {}

    @staticmethod
    def _new_progress() -> Progress:
        return Progress(
            TextColumn("[bold]{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )

    def _stop(self):
        if self.progress.live.is_started:  # stopping a bar that never started prints a blank line
            self.progress.stop()

    def stage_start(self, stage, total, done):
        self._stop()
        self.progress = self._new_progress()  # one bar per stage; finished stages stay printed above
        self.progress.start()
        self.tasks[stage] = self.progress.add_task(stage, total=total, completed=done, loss="-", speed="-")
        self.started = (time.monotonic(), done, total)

    def step(self, stage, step, loss, lr, tokens_per_s):
        self.progress.update(self.tasks[stage], completed=step, loss=f"{loss:.4f}", speed=f"{tokens_per_s:,.0f}")
        t0, done, total = self.started
        if not self.progress.console.is_terminal and (step % max(1, total // 20) == 0 or step == total):
            left = (time.monotonic() - t0) / (step - done) * (total - step)  # a log file gets a line instead of a bar
            self.message(f"{stage} {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  ETA {left:.0f}s")

    def evaluated(self, stage, step, perplexity):
        self.message(f"held-out perplexity {'before training' if stage == 'start' else f'after {stage} step {step}'}: {perplexity:.3f}")

    def stage_end(self, stage):
        self._stop()

    def message(self, text):
        self.progress.console.print(text, highlight=False, soft_wrap=True)

    def close(self):
        self._stop()


def _table(result) -> Table:
    table = Table(title=f"Fine-tuned → {result.output}")
    for col in ("stage", "steps", "first loss", "last loss", "tokens/s"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in result.stages:
        speed = f"{s.tokens / s.seconds:,.0f}" if s.seconds else "-"
        first, last = (f"{s.losses[0]:.4f}", f"{s.losses[-1]:.4f}") if s.losses else ("-", "-")
        table.add_row(s.name, str(s.steps), first, last, speed)
    for e in result.evals:
        where = "before training" if e["stage"] == "start" else f"after {e['stage']} step {e['step']}"
        table.add_row(f"perplexity {where}", "", "", f"{e['perplexity']:.3f}", "")
    if result.adapter is not None:
        table.caption = f"LoRA adapter (not merged): {result.adapter}"
    if result.medusa is not None:
        table.caption = (table.caption + "; " if table.caption else "") + f"Medusa heads: {result.medusa}"
    return table


@friendly
def finetune_command(
    checkpoint: str = typer.Argument(..., metavar="CHECKPOINT", help="A linconv checkpoint (made by `linconv convert`)."),
    output: str = typer.Argument(..., metavar="OUTPUT", help="New folder for the fine-tuned checkpoint (outside CHECKPOINT)."),
    recipe: str = typer.Option(DEFAULT_RECIPE, help=recipe_help()),
    text: str | None = typer.Option(
        None, help="Training text: a file, a folder of .txt files or a datasets name (default: the built-in training split)."
    ),
    transfer_steps: int | None = typer.Option(
        None, help=f"Attention-transfer steps (stage 1; 0 skips it; default: the recipe's; {_D.transfer_steps} in {DEFAULT_RECIPE})."
    ),
    lora_steps: int | None = typer.Option(
        None, help=f"LoRA fine-tuning steps (stage 2; 0 skips it; default: the recipe's; {_D.lora_steps} in {DEFAULT_RECIPE})."
    ),
    seq_len: int | None = typer.Option(None, help=f"Tokens per training window (default: the recipe's; {_D.seq_len} in {DEFAULT_RECIPE})."),
    batch_size: int | None = typer.Option(
        None, help=f"Windows per process per micro-step (default: the recipe's; {_D.batch_size} in {DEFAULT_RECIPE})."
    ),
    grad_accum: int | None = typer.Option(
        None, help=f"Micro-steps per optimizer step (default: the recipe's; {_D.grad_accum} in {DEFAULT_RECIPE})."
    ),
    lr: float | None = typer.Option(None, help=f"Learning rate of the LoRA stage (default: the recipe's; {_D.lr} in {DEFAULT_RECIPE})."),
    transfer_lr: float | None = typer.Option(
        None, help=f"Learning rate of the attention-transfer stage (default: the recipe's; {_D.transfer_lr} in {DEFAULT_RECIPE})."
    ),
    lora_rank: int | None = typer.Option(None, help=f"LoRA rank (default: the recipe's; {_D.lora_rank} in {DEFAULT_RECIPE})."),
    lora_alpha: float | None = typer.Option(None, help="LoRA alpha (default: 2 x rank)."),
    lora_targets: str | None = typer.Option(
        None,
        help=(
            "Projections that get LoRA: q,k,v,o or the model's own names (q_proj, "
            f"c_attn, ...; default: the recipe's; {_D.lora_targets} in {DEFAULT_RECIPE})."
        ),
    ),
    medusa_heads: int = typer.Option(_D.medusa_heads, help="Train this many Medusa draft heads (stage 3) on the fine-tuned model."),
    medusa_steps: int = typer.Option(_D.medusa_steps, help="Medusa training steps."),
    medusa_lr: float = typer.Option(_D.medusa_lr, help="Learning rate of the Medusa heads."),
    merge: bool = typer.Option(
        True, "--merge/--no-merge", help="Fold the LoRA adapters into the weights, or keep a peft adapter folder OUTPUT/adapter."
    ),
    resume: bool = typer.Option(False, help="Continue the interrupted run saved in OUTPUT.partial."),
    eval_every: int = typer.Option(_D.eval_every, help="Held-out perplexity every N steps, at the start and after each stage (0: never)."),
    eval_windows: int = typer.Option(_D.eval_windows, help="Held-out windows of --seq-len tokens per evaluation."),
    eval_text: str | None = typer.Option(None, help="Held-out text (default: the built-in held-out plays)."),
    save_every: int = typer.Option(_D.save_every, help="Write a resume state every N steps (always also on Ctrl-C; 0: only then)."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations in backward to save memory (LoRA stage)."),
    warmup: float | None = typer.Option(
        None,
        help=f"Fraction of each stage's steps spent warming the learning rate up (default: the recipe's; {_D.warmup} in {DEFAULT_RECIPE}).",
    ),
    seed: int = typer.Option(_D.seed, help="Seed of data order, LoRA init and dropout."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (under accelerate launch / torchrun each process gets its own)."),
    dtype: str = typer.Option("fp32", help="fp32, or bf16 / fp16 mixed-precision autocast (CUDA)."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT (and any stale OUTPUT.partial)."),
) -> None:
    """Recover quality after conversion: attention transfer, LoRA, optional Medusa heads."""
    from linconv import report
    from linconv.finetune import finetune

    given = dict(
        transfer_steps=transfer_steps,
        lora_steps=lora_steps,
        seq_len=seq_len,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        transfer_lr=transfer_lr,
        warmup=warmup,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
    )
    config = FinetuneConfig(
        **get_recipe(recipe).options("finetune", given),
        text=text,
        medusa_heads=medusa_heads,
        medusa_steps=medusa_steps,
        medusa_lr=medusa_lr,
        lora_alpha=lora_alpha,
        merge=merge,
        eval_every=eval_every,
        eval_windows=eval_windows,
        eval_text=eval_text,
        save_every=save_every,
        gradient_checkpointing=gradient_checkpointing,
        dtype=dtype,
        seed=seed,
    )
    reporter = RichReporter()
    try:
        result = finetune(checkpoint, output, config, resume=resume, overwrite=overwrite, device=device, reporter=reporter)
    finally:
        reporter.close()
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        report.print_table(_table(result))
