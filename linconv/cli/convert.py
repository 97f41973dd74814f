"""``linconv convert``: checkpoint in, linearized checkpoint out."""

from __future__ import annotations

from datetime import datetime, timezone

import torch
import typer

from linconv.attention.variants import VARIANTS
from linconv.cli.common import console, friendly, parse_device, parse_layers
from linconv.config import parse_dtype
from linconv.errors import LinconvError
from linconv.recipes import DEFAULT_RECIPE, get_recipe, recipe_help

VARIANT_HELP = "Attention variant: " + "; ".join(f"{n}: {v.description}" for n, v in VARIANTS.items())


@friendly
def convert_command(
    paths: list[str] = typer.Argument(
        ...,
        metavar="[SOURCE] OUTPUT",
        help="SOURCE: HF folder, hub id or .gguf file (default: the built-in SmolLM2-135M-Instruct). OUTPUT: new folder.",
    ),
    recipe: str = typer.Option(DEFAULT_RECIPE, help=recipe_help()),
    attention: str | None = typer.Option(None, "--attention", "-a", help=VARIANT_HELP + " (default: the recipe's)."),
    group_size: int | None = typer.Option(None, help="Tokens per group of the local/global split (default: the recipe's)."),
    conv_kernel: int | None = typer.Option(
        None, help="Causal DWConv taps on V (0 disables; default: the variant's, 32 for the augmented ones)."
    ),
    unmasked_conv: bool = typer.Option(
        False, help="Ablation: drop the conv's causal mask (2K−1 taps, K−1 of them future). Leaks; needs --allow-noncausal."
    ),
    keep_softmax_layers: str | None = typer.Option(None, help="Comma-separated layers that keep softmax attention (hybrid model)."),
    softmax_every: int | None = typer.Option(
        None, help="Also keep every N-th layer softmax (layers N−1, 2N−1, …; default: the recipe's, 0 = none)."
    ),
    allow_noncausal: bool = typer.Option(False, help="Allow a non-causal model (linformer, --unmasked-conv); it leaks future tokens."),
    seed: int = typer.Option(0, help="Seed of the new parameters' initialisation."),
    dtype: str | None = typer.Option(None, help="fp32, bf16 or fp16 (default: fp32)."),
    device: str | None = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
) -> None:
    """Replace a causal LM's softmax attention with linear attention and save the new checkpoint."""
    import linconv
    from linconv import report
    from linconv.checkpoint import check_output, save_checkpoint
    from linconv.convert import summarize
    from linconv.models import ADAPTERS
    from linconv.sources import load_source

    if len(paths) not in (1, 2):
        raise LinconvError("expected [SOURCE] OUTPUT")
    source, output = (None, paths[0]) if len(paths) == 1 else paths
    check_output(output, overwrite=overwrite, inputs=(source,))
    given = dict(attention=attention, group_size=group_size, conv_kernel=conv_kernel, softmax_every=softmax_every)
    cfg = linconv.LinearizeConfig(
        **get_recipe(recipe).options("convert", given),
        conv_mask=not unmasked_conv,
        keep_softmax_layers=parse_layers(keep_softmax_layers),
        allow_noncausal=allow_noncausal,
        seed=seed,
    ).validate()
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    with console.status("loading the source model…"):
        base, tokenizer = load_source(source, ADAPTERS, dtype=torch_dtype or torch.float32, device=torch_device)
    cfg.source = str(source) if source else "default:SmolLM2-135M-Instruct"
    with console.status("converting…"):
        model = linconv.convert(base, cfg)
    summary = summarize(model)
    card = {
        "made_by": f"linconv {linconv.__version__} convert",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": cfg.source,
        "recipe": recipe,
        **{k: v for k, v in cfg.to_dict().items() if k != "source"},
    }
    with console.status(f"saving {output}…"):
        save_checkpoint(model, tokenizer, output, card=card, overwrite=overwrite)
    report.print_table(report.conversion_table(summary, output))
