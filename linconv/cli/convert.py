"""``linconv convert``: checkpoint in, linearized checkpoint out."""

from __future__ import annotations

from typing import Annotated

import typer

from linconv import report
from linconv.attention.variants import VARIANTS
from linconv.checkpoint import check_output, save_checkpoint
from linconv.cli.common import console, friendly, parse_device, parse_layers
from linconv.config import parse_dtype
from linconv.convert import conversion_card, load_and_convert, summarize
from linconv.errors import LinconvError
from linconv.recipes import DEFAULT_RECIPE, get_recipe, recipe_help

VARIANT_HELP = "Attention variant: " + "; ".join(f"{n}: {v.description}" for n, v in VARIANTS.items())


@friendly
def convert_command(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="[SOURCE] OUTPUT",
            help="SOURCE: HF folder, hub id or .gguf file (default: the built-in SmolLM2-135M-Instruct). OUTPUT: new folder.",
        ),
    ],
    recipe: Annotated[str, typer.Option(help=recipe_help())] = DEFAULT_RECIPE,
    attention: Annotated[str | None, typer.Option("--attention", "-a", help=VARIANT_HELP + " (default: the recipe's).")] = None,
    group_size: Annotated[int | None, typer.Option(help="Tokens per group of the local/global split (default: the recipe's).")] = None,
    sinks: Annotated[
        int | None,
        typer.Option(
            help="First tokens that every later group also attends in its local score (attention sinks; default: a whole group, 0: none)."
        ),
    ] = None,
    conv_kernel: Annotated[
        int | None, typer.Option(help="Causal DWConv taps on V (0 disables; default: the variant's, 32 for the augmented ones).")
    ] = None,
    unmasked_conv: Annotated[
        bool, typer.Option(help="Ablation: drop the conv's causal mask (2K−1 taps, K−1 of them future). Leaks; needs --allow-noncausal.")
    ] = False,
    keep_softmax_layers: Annotated[str | None, typer.Option(help="Comma-separated layers that keep softmax attention (hybrid).")] = None,
    softmax_every: Annotated[
        int | None, typer.Option(help="Also keep every N-th layer softmax (layers N−1, 2N−1, …; default: the recipe's, 0 = none).")
    ] = None,
    allow_noncausal: Annotated[bool, typer.Option(help="Allow a model that leaks future tokens (linformer, --unmasked-conv).")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of the new parameters' initialisation (default: the recipe's, 0).")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: fp32).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Replace a causal LM's softmax attention with linear attention and save the new checkpoint."""
    if len(paths) not in (1, 2):
        raise LinconvError("expected [SOURCE] OUTPUT")
    source, output = (None, paths[0]) if len(paths) == 1 else paths
    check_output(output, overwrite=overwrite, inputs=(source,))
    cfg = get_recipe(recipe).linearize_config(  # None: not given, the recipe's (or the default) value
        attention=attention,
        group_size=group_size,
        sinks=sinks,
        conv_kernel=conv_kernel,
        softmax_every=softmax_every,
        conv_mask=False if unmasked_conv else None,
        keep_softmax_layers=parse_layers(keep_softmax_layers) or None,
        allow_noncausal=allow_noncausal or None,
        seed=seed,
    )
    cfg.validate()
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    with console.status("loading the source model and converting it…"):
        model, tokenizer, _ = load_and_convert(source, cfg, dtype=torch_dtype, device=torch_device)
    with console.status(f"saving {output}…"):
        save_checkpoint(model, tokenizer, output, card=conversion_card(model, recipe), overwrite=overwrite)
    report.print_table(report.conversion_table(summarize(model), output))
