"""``linconv generate``: stream text from a linearized checkpoint with O(1)-memory decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from linconv import report
from linconv.cli.common import console, friendly, parse_device
from linconv.compiled import compile_plan
from linconv.config import parse_dtype
from linconv.convert import load_or_convert
from linconv.data import read_text_file
from linconv.errors import LinconvError
from linconv.generate import check_options, generate
from linconv.speculative.decode import SpeculativeDecoder
from linconv.speculative.drafts import check_draft, make_draft


def _prompt_text(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise LinconvError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        prompt = read_text_file(prompt_file, "--prompt-file")
    if not prompt.strip():
        raise LinconvError("the prompt is empty")
    return prompt


def _load(checkpoint: str | None, dtype, device):
    """(model, tokenizer): a checkpoint folder, or a fresh conversion of the default model."""
    what = f"loading {checkpoint}…" if checkpoint is not None else "loading and converting the default model (SmolLM2-135M-Instruct)…"
    with console.status(what):
        model, tokenizer, _ = load_or_convert(checkpoint, dtype=dtype, device=device)
    if tokenizer is None:
        raise LinconvError(f"{checkpoint} has no tokenizer files; save the tokenizer into the folder")
    return model, tokenizer


def _encode(tokenizer, text: str, chat: bool, explicit: bool) -> list[int]:
    if chat and tokenizer.chat_template is None:
        if explicit:
            raise LinconvError("--chat: the tokenizer has no chat template; use --no-chat")
        chat = False
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


@friendly
def generate_command(
    checkpoint: Annotated[
        str | None,
        typer.Argument(
            help="A linconv checkpoint folder (default: a fresh conversion of the built-in SmolLM2-135M-Instruct, cached nowhere)."
        ),
    ] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt text.")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", "-f", help="Read the prompt from this file.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy; higher samples more freely.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample only from the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Sample only from the smallest set of tokens whose probability reaches p.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling (reproducible output).")] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop when this text appears (repeatable); the model's eos token always stops.")
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Wrap the prompt in the tokenizer's chat template (default: on for the default model, off for a checkpoint).",
        ),
    ] = None,
    prefill_chunk: Annotated[int, typer.Option(help="Prompt tokens per prefill forward (bounds memory on long prompts).")] = 2048,
    spec_decode: Annotated[
        bool,
        typer.Option(
            "--spec-decode",
            help=(
                "Speculative decoding: a draft proposes a tree, one forward verifies "
                "it (greedy: identical output; sampling: the same distribution)."
            ),
        ),
    ] = False,
    draft: Annotated[
        str,
        typer.Option(
            help="With --spec-decode: lookup (n-grams of the context), medusa (finetune --medusa-heads), "
            "eagle (finetune --draft-head eagle) or model:PATH."
        ),
    ] = "lookup",
    draft_tokens: Annotated[int, typer.Option(help="With --spec-decode: tokens a lookup or draft-model guess runs ahead.")] = 8,
    tree_widths: Annotated[
        str | None,
        typer.Option(
            help="With --spec-decode: candidates per tree depth (medusa, eagle; default: the tree measured with the draft), "
            "or candidate paths (lookup: first number, default 4)."
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Run the decode steps through torch.compile (needs a C++ compiler; compiling takes minutes on a CPU). Default: eager.",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: the checkpoint's; fp32 for the default model).")] = None,
) -> None:
    """Generate text from a linearized checkpoint, streaming it as it comes; a last line gives tokens/s."""
    text = _prompt_text(prompt, prompt_file)
    check_options(max_new_tokens, temperature, top_k, top_p, prefill_chunk)
    widths = _widths(tree_widths) if spec_decode else None
    if spec_decode:
        check_draft(draft, checkpoint, draft_tokens=draft_tokens, tree_widths=widths)
    use_compile, note = compile_plan(parse_device(device), compile)
    if note:
        console.print(note, highlight=False)
    model, tokenizer = _load(checkpoint, parse_dtype(dtype), parse_device(device))
    ids = _encode(tokenizer, text, checkpoint is None if chat is None else chat, chat is not None)
    drafter = make_draft(draft, model, tokenizer, checkpoint, draft_tokens=draft_tokens, tree_widths=widths) if spec_decode else None
    decoder = SpeculativeDecoder(drafter) if spec_decode else None

    def stream(row: int, token: int, piece: str) -> None:
        if piece:
            typer.echo(piece, nl=False)

    result = generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_strings=stop or (),
        tokenizer=tokenizer,
        prefill_chunk=prefill_chunk,
        on_token=stream,
        decoder=decoder,
        compile=use_compile,
    )
    typer.echo("")
    console.print(report.generation_line(result), highlight=False, soft_wrap=True)
    if decoder is not None:
        console.print(report.speculative_line(decoder.result(result)), highlight=False, soft_wrap=True)


def _widths(tree_widths: str | None) -> list[int] | None:
    """``--tree-widths`` as numbers; None when not given (the draft's stored or default tree)."""
    try:
        return None if tree_widths is None else [int(w) for w in tree_widths.split(",")]
    except ValueError:
        raise LinconvError(f"--tree-widths takes comma-separated numbers, got {tree_widths!r}") from None
