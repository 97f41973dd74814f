"""Bad and adversarial inputs to every command, as a table: each must end in exit code 1 and exactly
one line ``error: …`` (no traceback), leave no output or temporary file behind, and leave its inputs
untouched. A row: an id, the command line ({name} stands for a prepared input, {w} for the row's own
empty folder), an optional setup that prepares {w}, and a fragment of the expected message."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import _CORPUS, save_tiny, tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from typer.testing import CliRunner

import linconv
from linconv.checkpoint import save_checkpoint
from linconv.cli import app
from linconv.speculative.medusa import MedusaHeads, save_medusa

runner = CliRunner()
TEXT = ("\n".join(_CORPUS) + "\n") * 12


@dataclass
class Case:
    id: str
    args: str  # the command line, split on spaces after {placeholders} are filled in
    message: str
    setup: Callable[[Path], None] | None = None
    code: int = 1


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _copy(world: Path, name: str, to: str, edit: Callable[[Path], None]) -> None:
    shutil.copytree(world / name, world / to)
    edit(world / to)


def pickled(folder: Path) -> None:
    """Replace model.safetensors by pytorch_model.bin (transformers 5 saves safetensors only)."""
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Every prepared input, made once; the rows must leave all of it as it was."""
    root = tmp_path_factory.mktemp("inputs")
    save_tiny("llama", root / "src")
    tok = tiny_tokenizer()
    model = linconv.convert(tiny_model("llama", eos_token_id=None), linconv.LinearizeConfig(group_size=4, conv_kernel=3))
    save_checkpoint(model, tok, root / "ckpt", card={})
    save_checkpoint(model, tok, root / "medusa", card={}, extra=lambda f: save_medusa(MedusaHeads.for_model(model, 3), f))
    gpt2 = linconv.convert(tiny_model("gpt2"), linconv.LinearizeConfig(group_size=4, conv_kernel=3))
    save_checkpoint(gpt2, tok, root / "gpt2", card={})
    for name, src in (("pt", "src"), ("ptckpt", "ckpt")):  # the same folders with pickle weights only
        _copy(root, src, name, pickled)
    save_tiny("llama", root / "bigvocab", vocab_size=128)  # the same tokenizer, a larger embedding
    _copy(root, "src", "heads", lambda f: _config(f, hidden_size=30))  # transformers rejects: 30 % 4 heads
    _copy(root, "src", "typed", lambda f: _config(f, hidden_size="abc"))
    _copy(root, "src", "badjson", lambda f: (f / "config.json").write_text("{not json"))
    _copy(root, "src", "latin1cfg", lambda f: (f / "config.json").write_bytes(b'{"model_type": "llama\xe9"}'))
    _copy(root, "src", "listcfg", lambda f: (f / "config.json").write_text("[1, 2]"))
    _copy(root, "src", "bert", lambda f: _config(f, model_type="bert", architectures=["BertModel"]))
    _copy(root, "src", "trunc", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]))
    _copy(root, "src", "noweights", lambda f: (f / "model.safetensors").unlink())
    (root / "text.txt").write_text(TEXT)
    (root / "latin1.txt").write_bytes(TEXT.encode() + "caf\xe9\n".encode("latin-1"))
    (root / "nul.txt").write_bytes(TEXT.encode() + b"\x00\x00")
    (root / "notxt").mkdir()
    (root / "notxt" / "a.md").write_text(TEXT)
    (root / "file").write_text("a plain file")
    return root


def unwritable(w: Path) -> Path:
    """A folder nobody may write in: /sys for root (which ignores permissions), else a read-only one."""
    if os.geteuid() == 0:
        return Path("/sys")
    (w / "ro").mkdir()
    (w / "ro").chmod(0o555)
    return w / "ro"


def broken_link(w: Path) -> None:
    (w / "link").symlink_to(w / "gone")


def folder(name: str) -> Callable[[Path], None]:
    return lambda w: (w / name).mkdir()


def a_file(w: Path) -> None:
    (w / "f").write_text("x")


CONVERT = [
    Case("pickle-only source", "convert {pt} {w}/out", "pickle weights"),
    Case("no weights at all", "convert {noweights} {w}/out", "has no weights"),
    Case("config rejected by transformers", "convert {heads} {w}/out", "not a multiple of the number of attention heads"),
    Case("config field of the wrong type", "convert {typed} {w}/out", "expected int"),
    Case("config.json not JSON", "convert {badjson} {w}/out", "could not read"),
    Case("config.json not UTF-8", "convert {latin1cfg} {w}/out", "could not read"),
    Case("config.json not an object", "convert {listcfg} {w}/out", "not a JSON object"),
    Case("not a causal LM", "convert {bert} {w}/out", "not a causal LM"),
    Case("truncated safetensors", "convert {trunc} {w}/out", "truncated or corrupt"),
    Case("missing source", "convert {w}/nope {w}/out", "no such file or folder"),
    Case("source is a plain file", "convert {file} {w}/out", "neither a model folder nor a .gguf file"),
    Case("output under a file", "convert {src} {w}/f/out", "is not a folder", a_file),
    Case("output a broken symlink", "convert {src} {w}/link", "broken symbolic link", broken_link),
    Case("output under a broken symlink", "convert {src} {w}/link/out", "broken symbolic link", broken_link),
    Case("output in an unwritable folder", "convert {src} {ro}/out", "cannot write"),
    Case("output is the source", "convert {src} {src} --overwrite", "overlaps the input"),
    Case("output inside the source", "convert {src} {src}/out", "overlaps the input"),
    Case("output exists", "convert {src} {w}/out", "already exists", folder("out")),
    Case("group size of terabytes", "convert {src} {w}/out --group-size 1000000000000", "--group-size must be <= 8192"),
    Case("conv kernel of gigabytes", "convert {src} {w}/out --conv-kernel 1000000000", "--conv-kernel must be <= 1024"),
    Case("group size 0", "convert {src} {w}/out --group-size 0", "--group-size must be > 0"),
    Case("unknown variant", "convert {src} {w}/out --attention nope", "unknown attention variant"),
    Case("linformer without permission", "convert {src} {w}/out --attention linformer", "not causal"),
    Case("unmasked conv without permission", "convert {src} {w}/out --unmasked-conv", "not causal"),
    Case("softmax layer out of range", "convert {src} {w}/out --keep-softmax-layers 7", "out of range"),
    Case("unknown recipe", "convert {src} {w}/out --recipe nope", "unknown recipe"),
    Case("unknown dtype", "convert {src} {w}/out --dtype fp8", "unknown dtype"),
]

_FT = "finetune {ckpt} {w}/out --text {text} --seq-len 16 --transfer-steps 1 --lora-steps 1 --device cpu"
FINETUNE = [
    Case("learning rate inf", _FT + " --lr inf", "--lr must be > 0 and finite"),
    Case("learning rate nan", _FT + " --lr nan", "--lr must be > 0 and finite"),
    Case("transfer learning rate inf", _FT + " --transfer-lr inf", "--transfer-lr must be > 0 and finite"),
    Case("medusa learning rate inf", _FT + " --medusa-heads 1 --medusa-lr inf", "--medusa-lr must be > 0 and finite"),
    Case("lora alpha inf", _FT + " --lora-alpha inf", "--lora-alpha must be > 0"),
    Case("warmup nan", _FT + " --warmup nan", "--warmup"),
    Case("seq-len past GPT-2 positions", "finetune {gpt2} {w}/out --text {text} --seq-len 129 --device cpu", "128 positions"),
    Case("training text not UTF-8", "finetune {ckpt} {w}/out --text {latin1} --seq-len 16 --device cpu", "is not UTF-8"),
    Case("training text binary", "finetune {ckpt} {w}/out --text {nul} --seq-len 16 --device cpu", "NUL bytes"),
    Case("eval text not UTF-8", _FT + " --eval-every 1 --eval-text {latin1}", "is not UTF-8"),
    Case("text folder without .txt", "finetune {ckpt} {w}/out --text {notxt} --device cpu", "no .txt files"),
    Case("text file missing", "finetune {ckpt} {w}/out --text {w}/nope.txt --device cpu", "does not exist"),
    Case("pickle-only checkpoint", "finetune {ptckpt} {w}/out --text {text} --seq-len 16 --device cpu", "pickle weights"),
    Case("not a linconv checkpoint", "finetune {src} {w}/out --text {text} --device cpu", "not a linconv checkpoint"),
    Case("output under a file", _FT.replace("{w}/out", "{w}/f/out"), "is not a folder", a_file),
    Case("output a broken symlink", _FT.replace("{w}/out", "{w}/link"), "broken symbolic link", broken_link),
    Case("output in an unwritable folder", _FT.replace("{w}/out", "{ro}/out"), "cannot write"),
    Case("output inside the checkpoint", _FT.replace("{w}/out", "{ckpt}/out"), "inside CHECKPOINT"),
    Case("output exists", _FT, "already exists", folder("out")),
    Case("nothing to resume", _FT + " --resume", "nothing to resume"),
    Case("seq-len 1", _FT.replace("--seq-len 16", "--seq-len 1"), "at least 2"),
    Case("unknown LoRA target", _FT + " --lora-targets nope", "unknown LoRA target"),
    Case("fp16 autocast on CPU", _FT + " --dtype fp16", "needs a CUDA device"),
]

_B = "bench {ckpt} --tasks ppl --text {text} --ppl-window 32 --ppl-tokens 64 --threads 1 --device cpu --baseline none"
BENCH = [
    Case("memory budget nan", _B + " --memory-budget nan", "--memory-budget must be > 0 GiB and finite"),
    Case("memory budget inf", _B + " --memory-budget inf", "--memory-budget must be > 0 GiB and finite"),
    Case("threads -1", _B.replace("--threads 1", "--threads -1"), "--threads must be > 0"),
    Case("trial timeout nan", _B + " --trial-timeout nan", "--trial-timeout must be > 0 and finite"),
    Case("trial timeout inf", _B + " --trial-timeout inf", "--trial-timeout must be > 0 and finite"),
    Case("json under a file", _B + " --json {w}/f/out.json", "is not a folder", a_file),
    Case("json onto a folder", _B + " --json {w}/d", "is a folder", folder("d")),
    Case("json a broken symlink", _B + " --json {w}/link", "broken symbolic link", broken_link),
    Case("json in an unwritable folder", _B + " --json {ro}/out.json", "cannot write"),
    Case("plot under a file", _B + " --plot {w}/f/out.png", "is not a folder", a_file),
    Case("plot onto a folder", _B + " --plot {w}/d.png", "is a folder", folder("d.png")),
    Case("plot not png", _B + " --plot {w}/out.svg", ".png"),
    Case("json inside the checkpoint", _B + " --json {ckpt}/r.json", "overlaps the input"),
    Case("text not UTF-8", _B.replace("{text}", "{latin1}"), "is not UTF-8"),
    Case("baseline with pickle weights", _B.replace("none", "{pt}"), "pickle weights"),
    Case("baseline config rejected", _B.replace("none", "{heads}"), "not a multiple of the number of attention heads"),
    Case("contexts 0", _B + " --contexts 0", "--contexts needs positive"),
    Case("ppl window 1", _B.replace("--ppl-window 32", "--ppl-window 1"), "at least 2"),
    Case("unknown task", _B.replace("--tasks ppl", "--tasks nope"), "unknown task"),
    Case("granularity 0", _B + " --granularity 0", "granularity must be > 0"),
    Case("pickle-only checkpoint", _B.replace("{ckpt}", "{ptckpt}"), "pickle weights"),
    Case("missing checkpoint", _B.replace("{ckpt}", "{w}/nope"), "does not exist"),
]

_G = "generate {ckpt} --prompt hello --max-new-tokens 4 --device cpu"
_S = _G + " --spec-decode"
GENERATE = [
    Case("temperature nan", _G + " --temperature nan", "--temperature must be >= 0 and finite"),
    Case("temperature inf", _G + " --temperature inf", "--temperature must be >= 0 and finite"),
    Case("top-p nan", _G + " --temperature 1 --top-p nan", "--top-p must be in (0, 1]"),
    Case("top-k 0", _G + " --temperature 1 --top-k 0", "--top-k must be > 0"),
    Case("prefill chunk 0", _G + " --prefill-chunk 0", "--prefill-chunk must be > 0"),
    Case("prompt file not UTF-8", "generate {ckpt} --prompt-file {latin1} --device cpu", "is not UTF-8"),
    Case("prompt file binary", "generate {ckpt} --prompt-file {nul} --device cpu", "NUL bytes"),
    Case("prompt file missing", "generate {ckpt} --prompt-file {w}/nope.txt --device cpu", "cannot read --prompt-file"),
    Case("prompt file a folder", "generate {ckpt} --prompt-file {notxt} --device cpu", "cannot read --prompt-file"),
    Case("prompt past GPT-2 positions", "generate {gpt2} --prompt-file {text} --device cpu", "context limit is 128"),
    Case("pickle-only checkpoint", _G.replace("{ckpt}", "{ptckpt}"), "pickle weights"),
    Case("not a linconv checkpoint", _G.replace("{ckpt}", "{src}"), "not a linconv checkpoint"),
    Case("draft with pickle weights", _S + " --draft model:{pt}", "pickle weights"),
    Case("draft with another vocabulary", _S + " --draft model:{bigvocab}", "vocabulary of 128 tokens, the target 96"),
    Case("draft config not JSON", _S + " --draft model:{badjson}", "could not read"),
    Case("draft config rejected", _S + " --draft model:{heads}", "not a multiple of the number of attention heads"),
    Case("draft missing", _S + " --draft model:{w}/nope", "no such file or folder"),
    Case("draft path empty", _S + " --draft model:", "needs a PATH"),
    Case("unknown draft", _S + " --draft nope", "unknown draft"),
    Case("medusa without heads", _S + " --draft medusa", "no Medusa heads"),
    Case("medusa without a checkpoint", "generate --prompt hi --spec-decode --draft medusa", "needs a checkpoint"),
    Case("medusa widths past the vocabulary", _S.replace("{ckpt}", "{medusa}") + " --draft medusa --tree-widths 1000", "vocabulary"),
    Case("medusa tree of millions", _S.replace("{ckpt}", "{medusa}") + " --draft medusa --tree-widths 64,64,64", "nodes"),
    Case("tree widths 0", _S + " --tree-widths 0", "--tree-widths must be positive"),
    Case("tree widths not numbers", _S + " --tree-widths a,b", "comma-separated numbers"),
    Case("draft tokens 0", _S + " --draft-tokens 0", "--draft-tokens must be > 0"),
    Case("empty prompt", "generate {ckpt} --prompt  --device cpu", "the prompt is empty"),
]

COMMANDS = {"convert": CONVERT, "finetune": FINETUNE, "bench": BENCH, "generate": GENERATE}
CASES = [pytest.param(c, id=f"{cmd}: {c.id}") for cmd, cases in COMMANDS.items() for c in cases]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (hidden ones included) with its kind, size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_the_table_covers_every_command():
    assert len(CASES) >= 60 and {c.values[0].args.split()[0] for c in CASES} == {"convert", "finetune", "bench", "generate"}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, world: Path, tmp_path: Path):
    w = tmp_path / "w"
    w.mkdir()
    if case.setup is not None:
        case.setup(w)
    names = {p.stem: str(p) for p in world.iterdir()} | {"w": str(w), "ro": "{ro}"}
    if "{ro}" in case.args:
        names["ro"] = str(unwritable(w))
    args = case.args.format(**names).split(" ")
    before, inputs = snapshot(w), snapshot(world)
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == case.code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert case.message in lines[0], lines[0]
    assert snapshot(w) == before, "the command left something behind"
    assert snapshot(world) == inputs, "the command changed its inputs"


@pytest.mark.parametrize(
    "args, says",
    [
        (["convert"], "Missing argument"),
        (["bench", "--threads", "abc"], "Invalid value for '--threads'"),
        (["generate", "--nope"], "No such option: --nope"),
        (["frobnicate"], "No such command"),
    ],
    ids=["missing argument", "not an integer", "unknown option", "unknown command"],
)
def test_usage_errors_are_one_line_and_exit_1(args, says):
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.output


def test_an_unexpected_exception_is_one_line_unless_debugging(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr("linconv.cli.convert.load_and_convert", broken)
    args = ["convert", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: KeyError: 'boom'"), result.output
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("LINCONV_DEBUG", "1")
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, KeyError)  # the traceback is let through
