"""``linconv finetune``: attention transfer, then LoRA, then optional draft heads (Medusa, EAGLE); resumable."""

from __future__ import annotations

from typing import Annotated

import torch.distributed as dist
import typer
from rich.table import Table

from linconv import report
from linconv.cli.common import friendly
from linconv.cli.progress import RichProgress
from linconv.finetune import FinetuneConfig, finetune
from linconv.recipes import DEFAULT_RECIPE, get_recipe, recipe_help

_D = FinetuneConfig()


def _by_recipe(value) -> str:
    """How an option that a recipe may set names its default."""
    return f"default: the recipe's; {value} in {DEFAULT_RECIPE}"


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
    if result.eagle is not None:
        table.caption = (table.caption + "; " if table.caption else "") + f"EAGLE head: {result.eagle}"
    return table


@friendly
def finetune_command(
    checkpoint: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="A linconv checkpoint (made by `linconv convert`).")],
    output: Annotated[str, typer.Argument(metavar="OUTPUT", help="New folder for the fine-tuned checkpoint (outside CHECKPOINT).")],
    recipe: Annotated[str, typer.Option(help=recipe_help())] = DEFAULT_RECIPE,
    text: Annotated[
        str | None,
        typer.Option(help="Training text: a file, a folder of .txt files or a datasets name (default: the built-in training split)."),
    ] = None,
    transfer_steps: Annotated[
        int | None, typer.Option(help=f"Attention-transfer steps (stage 1; 0 skips it; {_by_recipe(_D.transfer_steps)}).")
    ] = None,
    lora_steps: Annotated[
        int | None, typer.Option(help=f"LoRA fine-tuning steps (stage 2; 0 skips it; {_by_recipe(_D.lora_steps)}).")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help=f"Tokens per training window ({_by_recipe(_D.seq_len)}).")] = None,
    batch_size: Annotated[int | None, typer.Option(help=f"Windows per process per micro-step ({_by_recipe(_D.batch_size)}).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help=f"Micro-steps per optimizer step ({_by_recipe(_D.grad_accum)}).")] = None,
    lr: Annotated[float | None, typer.Option(help=f"Learning rate of the LoRA stage ({_by_recipe(_D.lr)}).")] = None,
    transfer_lr: Annotated[
        float | None, typer.Option(help=f"Learning rate of the attention-transfer stage ({_by_recipe(_D.transfer_lr)}).")
    ] = None,
    lora_rank: Annotated[int | None, typer.Option(help=f"LoRA rank ({_by_recipe(_D.lora_rank)}).")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: 2 x rank).")] = None,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            help=f"Projections that get LoRA: q,k,v,o or the model's own names (q_proj, c_attn, ...; {_by_recipe(_D.lora_targets)})."
        ),
    ] = None,
    medusa_heads: Annotated[
        int, typer.Option(help="Train this many Medusa draft heads (stage 3) on the fine-tuned model.")
    ] = _D.medusa_heads,
    medusa_steps: Annotated[int, typer.Option(help="Medusa training steps.")] = _D.medusa_steps,
    medusa_lr: Annotated[float, typer.Option(help="Learning rate of the Medusa heads.")] = _D.medusa_lr,
    draft_head: Annotated[
        str | None,
        typer.Option(
            help="Train a draft head (stage 4) on the fine-tuned model: eagle, saved as eagle.safetensors + eagle.json "
            "for `--spec-decode --draft eagle`."
        ),
    ] = None,
    draft_steps: Annotated[int, typer.Option(help="Draft-head training steps (batches of 4 distilled sequences).")] = _D.draft_steps,
    draft_lr: Annotated[float, typer.Option(help="Learning rate of the draft head.")] = _D.draft_lr,
    draft_prompts: Annotated[
        int, typer.Option(help="Windows of the training text that the model continues greedily: the draft head's training data.")
    ] = _D.draft_prompts,
    draft_new_tokens: Annotated[int, typer.Option(help="Tokens of the model's continuation of each draft prompt.")] = _D.draft_new_tokens,
    draft_text_windows: Annotated[
        int,
        typer.Option(
            help="More windows of the training text (--draft-new-tokens + 64 tokens each) that the draft head reads as they are: "
            "the model's features on real text, one forward each, no generation."
        ),
    ] = _D.draft_text_windows,
    draft_vocab: Annotated[
        int, typer.Option(help="Tokens the draft head may propose: the most frequent in its data (0: the whole vocabulary).")
    ] = _D.draft_vocab,
    draft_shape_prompts: Annotated[
        int,
        typer.Option(help="Held-out prompts on which the Medusa and EAGLE trees are measured on this device (0: the default tree)."),
    ] = _D.draft_shape_prompts,
    merge: Annotated[
        bool,
        typer.Option("--merge/--no-merge", help="Fold the LoRA adapters into the weights, or keep a peft adapter folder OUTPUT/adapter."),
    ] = True,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run saved in OUTPUT.partial.")] = False,
    eval_every: Annotated[
        int, typer.Option(help="Held-out perplexity every N steps, at the start and after each stage (0: never).")
    ] = _D.eval_every,
    eval_windows: Annotated[int, typer.Option(help="Held-out windows of --seq-len tokens per evaluation.")] = _D.eval_windows,
    eval_text: Annotated[str | None, typer.Option(help="Held-out text (default: the built-in held-out plays).")] = None,
    save_every: Annotated[
        int, typer.Option(help="Write a resume state every N steps (always also on Ctrl-C; 0: only then).")
    ] = _D.save_every,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in backward to save memory (LoRA stage).")] = False,
    warmup: Annotated[
        float | None, typer.Option(help=f"Fraction of each stage's steps spent warming the learning rate up ({_by_recipe(_D.warmup)}).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of data order, LoRA init and dropout.")] = _D.seed,
    loss: Annotated[
        str | None, typer.Option(help="LoRA-stage loss: ce (next token), kl (distil the original model) or mix (default: the recipe's).")
    ] = None,
    kl_temperature: Annotated[float, typer.Option(help="Temperature of the distillation KL.")] = _D.kl_temperature,
    mix_alpha: Annotated[float, typer.Option(help="With --loss mix: weight of CE; KL gets 1 - alpha.")] = _D.mix_alpha,
    text_mix: Annotated[
        str | None,
        typer.Option(help="selfgen:F — a share F of the training tokens written by the original model itself (sampled once, cached)."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (under accelerate launch / torchrun each process gets its own).")] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32, or bf16 / fp16 mixed-precision autocast (CUDA).")] = "fp32",
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT (and any stale OUTPUT.partial).")] = False,
) -> None:
    """Recover quality after conversion: attention transfer, LoRA, optional draft heads (Medusa, EAGLE)."""
    config = get_recipe(recipe).finetune_config(
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
        text=text,
        medusa_heads=medusa_heads,
        medusa_steps=medusa_steps,
        medusa_lr=medusa_lr,
        draft_head=draft_head,
        draft_steps=draft_steps,
        draft_lr=draft_lr,
        draft_prompts=draft_prompts,
        draft_new_tokens=draft_new_tokens,
        draft_text_windows=draft_text_windows,
        draft_vocab=draft_vocab,
        draft_shape_prompts=draft_shape_prompts,
        lora_alpha=lora_alpha,
        merge=merge,
        eval_every=eval_every,
        eval_windows=eval_windows,
        eval_text=eval_text,
        save_every=save_every,
        gradient_checkpointing=gradient_checkpointing,
        dtype=dtype,
        seed=seed,
        loss=loss,
        kl_temperature=kl_temperature,
        mix_alpha=mix_alpha,
        text_mix=text_mix,
    )
    with RichProgress(width=8) as progress:
        result = finetune(checkpoint, output, config, resume=resume, overwrite=overwrite, device=device, progress=progress)
    if not dist.is_initialized() or dist.get_rank() == 0:
        report.print_table(_table(result))
