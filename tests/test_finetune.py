"""``linconv finetune``: losses fall, exactly the intended tensors change per stage, resume is exact,
merged == adapter logits, Medusa heads round-trip, two processes (gloo) work, bad input is one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _CORPUS, tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from typer.testing import CliRunner

import linconv
from linconv import selfgen
from linconv.bench.perplexity import perplexity
from linconv.checkpoint import save_checkpoint
from linconv.cli import app
from linconv.errors import LinconvError
from linconv.finetune import STAGES, FinetuneConfig, finetune, lora_target_modules, resume_folder
from linconv.loss import distill_loss, lm_loss
from linconv.models.hf import linconv_tensor_names
from linconv.progress import Progress
from linconv.speculative.medusa import MedusaHeads, load_medusa, medusa_loss, save_medusa

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Converted tiny llama and gpt2 checkpoints, a training text and a one-window text."""
    root = tmp_path_factory.mktemp("ft")
    for arch in ("llama", "gpt2"):
        model = linconv.convert(tiny_model(arch), linconv.LinearizeConfig(group_size=4, conv_kernel=3))
        save_checkpoint(model, tiny_tokenizer(), root / arch, card={"made_by": "test", "attention": "augmented"})
    (root / "text.txt").write_text(("\n".join(_CORPUS) + "\n") * 12)
    (root / "one.txt").write_text(_CORPUS[1])  # 22 tokens: one window of 16
    return root


def run(data, out, arch="llama", **kw):
    options = {"text": str(data / "text.txt"), "seq_len": 16, "batch_size": 2, "transfer_steps": 0, "lora_steps": 0, **kw}
    return finetune(data / arch, out, FinetuneConfig(**options), device="cpu")


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {n for n in before if not torch.equal(before[n], after[n])}


def new_params(arch: str, data) -> set[str]:
    model, _ = linconv.load(data / arch)
    params = dict(model.named_parameters())
    return {n for n in linconv_tensor_names(model) if n in params}


# --------------------------------------------------------------------------------- training


def test_losses_decrease(data, tmp_path):
    """One window seen over and over: the transfer MSE, the LM loss and the Medusa loss fall."""
    result = run(
        data,
        tmp_path / "out",
        text=str(data / "one.txt"),
        batch_size=1,
        transfer_steps=10,
        lora_steps=20,
        medusa_heads=2,
        medusa_steps=10,
        transfer_lr=1e-2,
        lr=3e-2,
        medusa_lr=1e-1,
        warmup=0.0,
    )
    transfer, lora, medusa = (s.losses for s in result.stages)
    assert transfer[-1] < 0.97 * transfer[0] and lora[-1] < 0.95 * lora[0] and medusa[-1] < 0.9 * medusa[0], result.stages
    assert sum(lora[-3:]) < sum(lora[:3]) and sum(transfer[-3:]) < sum(transfer[:3])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transfer_changes_only_the_new_attention_parameters(data, tmp_path, arch):
    run(data, tmp_path / "out", arch, transfer_steps=3)
    attn = "model.layers.{}.self_attn" if arch == "llama" else "transformer.h.{}.attn"
    own = ("conv", "alpha", "feature_map.weight")  # augmented-softmax: DWConv, α, hedgehog map
    expected = {f"{attn.format(i)}.{p}" for i in range(2) for p in own}
    assert new_params(arch, data) == expected
    assert changed(weights(data / arch), weights(tmp_path / "out")) == expected
    card = json.loads((tmp_path / "out" / "linconv.json").read_text())
    assert card["made_by"].endswith("finetune") and card["finetune"]["transfer_steps"] == 3
    assert card["attention"] == "augmented"  # the conversion card is kept
    assert not resume_folder(tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arch, targets, projections",
    [
        ("llama", "q,v", ["self_attn.q_proj.weight", "self_attn.v_proj.weight"]),
        ("llama", "o_proj", ["self_attn.o_proj.weight"]),
        ("gpt2", "q,k,v,o", ["attn.c_attn.weight", "attn.c_proj.weight"]),  # not mlp.c_proj
    ],
)
def test_lora_changes_only_the_targets_and_the_new_parameters(data, tmp_path, arch, targets, projections):
    run(data, tmp_path / "out", arch, lora_steps=3, lora_targets=targets)
    prefix = "model.layers" if arch == "llama" else "transformer.h"
    expected = {f"{prefix}.{i}.{p}" for i in range(2) for p in projections}
    assert changed(weights(data / arch), weights(tmp_path / "out")) == expected | new_params(arch, data)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers alias
def test_merge_equals_adapter(data, tmp_path):
    """--no-merge: base checkpoint (new attention params trained) + peft adapter; same logits as --merge."""
    from peft import PeftModel

    kw = dict(transfer_steps=2, lora_steps=4, lr=1e-2)
    merged = run(data, tmp_path / "merged", **kw)
    split = run(data, tmp_path / "split", merge=False, **kw)
    assert merged.adapter is None and split.adapter == tmp_path / "split" / "adapter"
    assert (split.adapter / "adapter_config.json").is_file() and (split.adapter / "adapter_model.safetensors").is_file()
    assert changed(weights(data / "llama"), weights(tmp_path / "split")) == new_params("llama", data)
    ids = torch.randint(4, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    model, _ = linconv.load(tmp_path / "merged")
    base, _ = linconv.load(tmp_path / "split")
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        plain = base(ids, use_cache=False).logits
        adapted = PeftModel.from_pretrained(base, split.adapter).eval()
        got = adapted(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)  # the adapter matters


class Interrupter(Progress):
    """Sends itself Ctrl-C after the given (stage, step)s, as a user would."""

    def __init__(self, at):
        self.at = set(at)

    def update(self, task, completed, total=None, **fields):
        if (task, completed) in self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_is_identical_to_an_uninterrupted_run(data, tmp_path):
    cfg = FinetuneConfig(
        text=str(data / "text.txt"),
        seq_len=16,
        batch_size=2,
        transfer_steps=4,
        lora_steps=5,
        medusa_heads=2,
        medusa_steps=4,
        lr=1e-2,
        save_every=2,
    )
    straight = finetune(data / "llama", tmp_path / "a", cfg, device="cpu")
    out = tmp_path / "b"
    for at in [("transfer", 1), ("lora", 3), ("medusa", 2)]:
        with pytest.raises(KeyboardInterrupt):
            finetune(data / "llama", out, cfg, device="cpu", resume=resume_folder(out).exists(), progress=Interrupter([at]))
        progress = json.loads((resume_folder(out) / "progress.json").read_text())
        assert (progress["stage"], progress["step"]) == at and not out.exists()
    resumed = finetune(data / "llama", out, cfg, device="cpu", resume=True)
    a, b = weights(tmp_path / "a"), weights(out)
    assert not changed(a, b)
    ma, mb = load_file(str(tmp_path / "a" / "medusa.safetensors")), load_file(str(out / "medusa.safetensors"))
    assert not changed(ma, mb)
    assert [s.losses for s in resumed.stages] == [s.losses for s in straight.stages]
    assert not resume_folder(out).exists()


class SeesPeriodicSave(Interrupter):
    def update(self, task, completed, total=None, **fields):
        if completed == 3:
            self.saved = json.loads((resume_folder(self.out) / "progress.json").read_text())["step"]
        super().update(task, completed, total, **fields)


def test_periodic_save_and_cli_resume(data, tmp_path):
    out = tmp_path / "out"
    progress = SeesPeriodicSave([("transfer", 3)])
    progress.out = out
    with pytest.raises(KeyboardInterrupt):
        finetune(
            data / "llama",
            out,
            FinetuneConfig(text=str(data / "text.txt"), seq_len=16, transfer_steps=6, lora_steps=0, save_every=2),
            device="cpu",
            progress=progress,
        )
    assert progress.saved == 2  # written by --save-every before the Ctrl-C
    args = [
        "finetune",
        data / "llama",
        out,
        "--text",
        data / "text.txt",
        "--seq-len",
        16,
        "--transfer-steps",
        6,
        "--lora-steps",
        0,
        "--save-every",
        2,
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, [*map(str, args), "--seq-len", "8", "--resume"])
    assert result.exit_code == 1 and "--seq-len 16 (now 8)" in result.output
    result = runner.invoke(app, [*map(str, args), "--resume"])
    assert result.exit_code == 0, result.output
    assert "transfer" in result.output and out.is_dir() and not resume_folder(out).exists()


def _damage(partial: Path, how) -> None:
    if isinstance(how, dict):  # fields of progress.json to change
        progress = json.loads((partial / "progress.json").read_text())
        (partial / "progress.json").write_text(json.dumps({**progress, **how}))
    elif isinstance(how, str):  # a file to remove
        (partial / how).unlink()
    else:  # new bytes of progress.json
        (partial / "progress.json").write_bytes(how)


def test_a_damaged_or_foreign_resume_state_is_a_one_line_error(data, tmp_path):
    out = tmp_path / "out"
    cfg = FinetuneConfig(text=str(data / "text.txt"), seq_len=16, transfer_steps=3, lora_steps=0)
    with pytest.raises(KeyboardInterrupt):
        finetune(data / "llama", out, cfg, device="cpu", progress=Interrupter([("transfer", 1)]))
    partial, good = resume_folder(out), tmp_path / "good"
    shutil.copytree(partial, good)
    truncated = (partial / "progress.json").read_bytes()[:50]
    cases = [
        (truncated, "cannot read the resume state"),
        (b"\x00\xff garbage", "cannot read the resume state"),
        (b"[1, 2]", "is damaged (bad or missing stage, step, config, world_size, checkpoint, losses, evals)"),
        ({"step": "1"}, "is damaged (bad or missing step)"),
        ({"stage": "distill"}, "stopped in stage 'distill', which this run does not have (transfer)"),
        ({"step": 7}, "stopped at step 7 of transfer, which has 3 steps"),
        ({"checkpoint": str(data / "gpt2")}, f"continues a fine-tune of {data / 'gpt2'}, not of {data / 'llama'}"),
        ({"world_size": 2}, "was made with 2 processes, this run has 1"),
        ("optimizer.safetensors", "lacks optimizer.safetensors; start over with --overwrite"),
        ("optimizer.json", "lacks optimizer.json"),
        ("trainable.safetensors", "lacks trainable.safetensors"),
    ]
    args = ["--text", data / "text.txt", "--seq-len", 16, "--transfer-steps", 3, "--lora-steps", 0, "--device", "cpu", "--resume"]
    for how, message in cases:
        shutil.rmtree(partial)
        shutil.copytree(good, partial)
        _damage(partial, how)
        result = invoke(data / "llama", out, *args)
        assert result.exit_code == 1 and message in result.output, (how, result.output)
        assert len(result.output.strip().splitlines()) == 1 and not out.exists(), result.output
    shutil.rmtree(partial)
    shutil.copytree(good, partial)
    result = invoke(data / "llama", out, *args)
    assert result.exit_code == 0, result.output
    finetune(data / "llama", tmp_path / "straight", cfg, device="cpu")
    assert not changed(weights(tmp_path / "straight"), weights(out))


def test_eval_every_reports_heldout_perplexity(data, tmp_path):
    result = run(data, tmp_path / "out", transfer_steps=2, lora_steps=2, eval_every=1, eval_windows=2, eval_text=str(data / "text.txt"))
    assert [(e["stage"], e["step"]) for e in result.evals] == [("start", 0), ("transfer", 1), ("transfer", 2), ("lora", 1), ("lora", 2)]
    model, tok = linconv.load(tmp_path / "out")
    tokens = torch.tensor(tok(("\n".join(_CORPUS) + "\n") * 12, add_special_tokens=False)["input_ids"])
    assert perplexity(model, tokens, window=16, max_tokens=32).perplexity == pytest.approx(result.evals[-1]["perplexity"], rel=1e-5)


def test_default_heldout_text_is_used_for_eval(data, tmp_path):
    from linconv.data import builtin_text, tokenize

    result = run(data, tmp_path / "out", transfer_steps=1, eval_every=1, eval_windows=1)
    model, tok = linconv.load(data / "llama")
    first = tokenize(tok, builtin_text("heldout")[:2000])[:16]  # the first window of the held-out plays
    assert [e["stage"] for e in result.evals] == ["start", "transfer"]
    assert result.evals[0]["perplexity"] == pytest.approx(perplexity(model, first, window=16).perplexity, rel=1e-5)


def test_chunked_loss_equals_the_models_loss(data):
    model, _ = linconv.load(data / "gpt2")
    ids = torch.randint(4, 96, (2, 24))
    from linconv import loss

    old, loss.LOGITS_BUDGET = loss.LOGITS_BUDGET, 96 * 5  # 5 rows per chunk
    try:
        ours = lm_loss(model, ids)
    finally:
        loss.LOGITS_BUDGET = old
    torch.testing.assert_close(ours, model(ids, labels=ids, use_cache=False).loss, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_result(data, tmp_path):
    plain = run(data, tmp_path / "a", lora_steps=2)
    ckpt = run(data, tmp_path / "b", lora_steps=2, gradient_checkpointing=True)
    assert ckpt.stages[0].losses == pytest.approx(plain.stages[0].losses, rel=1e-5)
    torch.testing.assert_close(weights(tmp_path / "a"), weights(tmp_path / "b"), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------- Medusa


def test_medusa_heads_start_as_the_output_head_and_round_trip(data, tmp_path):
    model, _ = linconv.load(data / "llama")
    heads = MedusaHeads.for_model(model, 3)
    ids = torch.randint(4, 96, (2, 10))
    with torch.no_grad():
        hidden = model.model(ids, use_cache=False).last_hidden_state
        logits = heads(hidden)
        want = model(ids, use_cache=False).logits
    assert logits.shape == (3, 2, 10, 96)
    for i in range(3):
        torch.testing.assert_close(logits[i], want)
    assert medusa_loss(heads, hidden, ids) > 0
    with pytest.raises(LinconvError, match="no Medusa heads"):
        load_medusa(data / "llama")
    (tmp_path / "m").mkdir()
    with torch.no_grad():
        heads.blocks[1][0].linear.weight.normal_()
    save_medusa(heads, tmp_path / "m")
    back = load_medusa(tmp_path / "m", model)
    with torch.no_grad():
        torch.testing.assert_close(back(hidden), heads(hidden))
    with pytest.raises(LinconvError, match="not attached"):
        load_medusa(tmp_path / "m")(hidden)


def test_medusa_stage_trains_heads_on_the_frozen_model(data, tmp_path):
    result = run(data, tmp_path / "out", lora_steps=2, medusa_heads=2, medusa_steps=6, medusa_lr=1e-2)
    assert result.medusa == tmp_path / "out" / "medusa.safetensors"
    heads = load_medusa(tmp_path / "out")
    assert heads.num_heads == 2 and all(b[0].linear.weight.abs().sum() > 0 for b in heads.blocks)
    assert result.stages[-1].name == "medusa"
    # the model is the LoRA result: heads train on a frozen model
    again = run(data, tmp_path / "lora-only", lora_steps=2)
    assert again.stages[0].losses == result.stages[0].losses
    assert not changed(weights(tmp_path / "lora-only"), weights(tmp_path / "out"))


# ------------------------------------------------------------------------------ LoRA targets


def test_lora_target_names():
    llama = linconv.convert(tiny_model("llama"), linconv.LinearizeConfig(keep_softmax_layers=[1]))
    assert lora_target_modules(llama, "q,o") == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    gpt2 = linconv.convert(tiny_model("gpt2"))
    assert lora_target_modules(gpt2, "q,k,v") == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(LinconvError, match="valid targets: q, k, v, o, c_attn, c_proj"):
        lora_target_modules(gpt2, "q_proj")


# ----------------------------------------------------------------------------- CLI and errors


def invoke(*args):
    return runner.invoke(app, ["finetune", *map(str, args)])


def test_cli_runs_and_prints_a_summary(data, tmp_path):
    result = invoke(
        data / "llama",
        tmp_path / "out",
        "--text",
        data / "text.txt",
        "--seq-len",
        16,
        "--transfer-steps",
        2,
        "--lora-steps",
        2,
        "--lora-targets",
        "q,v",
        "--no-merge",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "Fine-tuned" in result.output and "lora" in result.output
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def _bad_inputs(data, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    common = ["--text", data / "text.txt", "--seq-len", 16, "--device", "cpu"]
    return [
        (["--recipe", "nope"], "unknown recipe 'nope'; choose from: linconv, hybrid, paper"),
        (["--text", tmp_path / "empty.txt"], "is empty"),
        (["--text", data / "one.txt", "--seq-len", 64], "fewer than one --seq-len window of 64"),
        ([*common, "--lora-rank", 0], "--lora-rank must be > 0"),
        ([*common, "--lora-rank", -2], "--lora-rank must be > 0"),
        (
            [*common, "--lora-targets", "q,x"],
            "unknown LoRA target 'x' for a llama model; valid targets: q, k, v, o, q_proj, k_proj, v_proj, o_proj",
        ),
        ([*common, "--resume"], "nothing to resume"),
        ([*common, "--seq-len", 0], "--seq-len must be > 0"),
        ([*common, "--transfer-steps", 0, "--lora-steps", 0], "nothing to do"),
        ([*common, "--dtype", "bf16"], "needs a CUDA device"),
        ([*common, "--dtype", "fp8"], "unknown --dtype"),
        ([*common, "--text", tmp_path / "missing.txt"], "does not exist"),
    ]


def test_bad_input_is_a_one_line_error(data, tmp_path):
    for args, message in _bad_inputs(data, tmp_path):
        result = invoke(data / "llama", tmp_path / "out", *args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "out").exists() and not resume_folder(tmp_path / "out").exists()


def test_bad_paths_are_one_line_errors(data, tmp_path, tiny_dir):
    cases = [
        ((tiny_dir("llama"), tmp_path / "out"), "not a linconv checkpoint; convert it first"),
        ((data / "llama", data / "llama" / "sub"), "is inside CHECKPOINT"),
        ((data / "llama", data / "llama"), "is inside CHECKPOINT"),
        ((data / "llama", data), "is inside OUTPUT"),
        ((tmp_path / "nope", tmp_path / "out"), "does not exist"),
    ]
    for (ck, out), message in cases:
        result = invoke(ck, out, "--transfer-steps", 1, "--device", "cpu")
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (data / "llama" / "sub").exists()
    (tmp_path / "exists").mkdir()
    result = invoke(data / "llama", tmp_path / "exists", "--device", "cpu")
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    resume_folder(tmp_path / "fresh").mkdir()
    result = invoke(data / "llama", tmp_path / "fresh", "--device", "cpu")
    assert result.exit_code == 1 and "pass --resume to continue it" in result.output


# ---------------------------------------------------------------------------- two processes


def test_two_processes_with_gloo_match_one_process(data, tmp_path):
    """Two CPU processes (gloo) with batch 1 each == one process with batch 2."""
    common = [
        "finetune",
        str(data / "llama"),
        "--text",
        str(data / "text.txt"),
        "--seq-len",
        "16",
        "--transfer-steps",
        "3",
        "--lora-steps",
        "3",
        "--lr",
        "1e-2",
        "--device",
        "cpu",
    ]
    # torchrun (what `accelerate launch --multi_gpu` runs); --standalone picks a free port
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(linconv.__file__).parents[1])}
    script = "import sys; from linconv.cli import app; app(sys.argv[1:])"
    (tmp_path / "cli.py").write_text(script)
    proc = subprocess.run(
        [*launcher, str(tmp_path / "cli.py"), *common[:2], str(tmp_path / "two"), *common[2:], "--batch-size", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two" / "model.safetensors").is_file()
    card = json.loads((tmp_path / "two" / "linconv.json").read_text())
    assert card["finetune"]["processes"] == 2
    result = runner.invoke(app, [*common[:2], str(tmp_path / "one"), *common[2:], "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert changed(weights(data / "llama"), two) == changed(weights(data / "llama"), one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)


def test_variant_without_trainable_attention_parameters_skips_transfer(tmp_path):
    model = linconv.convert(tiny_model("llama"), linconv.LinearizeConfig(attention="relu", conv_kernel=0))
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "relu", card={})
    (tmp_path / "text.txt").write_text(("\n".join(_CORPUS) + "\n") * 4)
    messages = []

    class Log(Progress):
        def message(self, text):
            messages.append(text)

    result = finetune(
        tmp_path / "relu",
        tmp_path / "out",
        FinetuneConfig(text=str(tmp_path / "text.txt"), seq_len=16, transfer_steps=2, lora_steps=1),
        device="cpu",
        progress=Log(),
    )
    assert any("transfer: this model has no trainable attention parameters" in m for m in messages)
    assert [s.name for s in result.stages if s.losses] == ["lora"]


def test_finetuning_a_finetuned_checkpoint_keeps_its_history(data, tmp_path):
    run(data, tmp_path / "first", transfer_steps=1, eval_every=1, eval_windows=1, eval_text=str(data / "text.txt"))
    finetune(
        tmp_path / "first",
        tmp_path / "second",
        FinetuneConfig(text=str(data / "text.txt"), seq_len=16, transfer_steps=0, lora_steps=1),
        device="cpu",
    )
    card = json.loads((tmp_path / "second" / "linconv.json").read_text())
    assert card["finetuned_from"] == str(tmp_path / "first") and card["finetune"]["lora_steps"] == 1
    assert "heldout_perplexity" not in card
    [earlier] = card["earlier_finetunes"]
    assert earlier["finetuned_from"] == str(data / "llama") and earlier["transfer_steps"] == 1 and earlier["heldout_perplexity"]


def test_every_stage_has_its_own_name_and_seed_number():
    """The number seeds a stage's data order: two stages sharing one would see the same windows."""
    assert len({s.name for s in STAGES}) == len({s.number for s in STAGES}) == len(STAGES)
    assert [s.name for s in STAGES] == ["transfer", "lora", "medusa", "eagle"]


def test_recipe_options_are_overridden_by_explicit_ones():
    from linconv.recipes import Recipe

    recipe = Recipe("r", "test", convert={"group_size": 32}, finetune={"lr": 0.5, "seq_len": 64})
    assert recipe.options("finetune", {"lr": None, "seq_len": 8, "lora_rank": None}) == {"lr": 0.5, "seq_len": 8}
    assert recipe.options("convert", {"attention": "relu", "group_size": None}) == {"group_size": 32, "attention": "relu"}
    FinetuneConfig(**recipe.options("finetune", {})).validate()


# --------------------------------------------------------------------------------- distillation and own text


@pytest.mark.parametrize("loss", ["kl", "mix"])
def test_distillation_loss_trains_toward_the_original(data, tmp_path, loss):
    """--loss kl/mix: the LoRA stage's loss is distill_loss (checked against it at step 0) and falls.
    An elu model with loud attention and sharp logits starts far from its original: something to learn."""
    original = tiny_model("llama")
    with torch.no_grad():
        original.model.norm.weight.mul_(50)
        for layer in original.model.layers:
            layer.self_attn.o_proj.weight.mul_(30)
    model = linconv.convert(original, linconv.LinearizeConfig(attention="elu"))
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "elu", card={"made_by": "test"})
    options = dict(text=str(data / "one.txt"), seq_len=16, batch_size=1, transfer_steps=0, lora_steps=8, lr=1e-4, warmup=0.0, loss=loss)
    result = finetune(tmp_path / "elu", tmp_path / "out", FinetuneConfig(**options), device="cpu")
    losses = result.stages[0].losses
    window = tiny_tokenizer()(_CORPUS[1])["input_ids"][:16]
    expected = distill_loss(model, torch.tensor([window]), alpha=0.5 if loss == "mix" else 0.0).item()
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    assert losses[-1] < 0.97 * losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses


def test_text_mix_trains_on_text_the_original_wrote(data, tmp_path, monkeypatch):
    """--text-mix selfgen:0.5 samples the original's own text once (cached) and mixes it in."""
    monkeypatch.setenv("LINCONV_CACHE", str(tmp_path / "cache"))
    calls = []
    real = selfgen.self_generated_text

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out.new_tokens)
        return out

    monkeypatch.setattr(selfgen, "self_generated_text", spy)
    small = dict(lora_steps=2, text_mix="selfgen:0.5")
    run(data, tmp_path / "a", **small)
    run(data, tmp_path / "b", **small)
    assert len(calls) == 2 and calls[0] > 0 and calls[1] == 0  # sampled once, then read from the cache
    assert list((tmp_path / "cache" / "selfgen").glob("*.json"))


@pytest.mark.parametrize(
    "options, says",
    [
        (dict(loss="xent"), "unknown --loss"),
        (dict(kl_temperature=float("nan")), "--kl-temperature"),
        (dict(mix_alpha=1.5), "--mix-alpha"),
        (dict(text_mix="wiki:0.5"), "wiki"),
    ],
)
def test_distillation_options_are_checked(options, says):
    with pytest.raises(LinconvError, match=says):
        FinetuneConfig(**options).validate()


def test_a_resume_state_from_before_an_option_existed_resumes_with_its_default(tmp_path):
    """A state saved by an older linconv lacks the newer options: it ran with their defaults."""
    from linconv.finetune.resume import ResumeState

    now = FinetuneConfig().fingerprint()
    older = {k: v for k, v in now.items() if k not in ("loss", "text_mix")}
    state = ResumeState("lora", 3, older, 1, str(tmp_path), {}, [])
    for name in ("trainable.safetensors", "optimizer.safetensors", "optimizer.json"):
        (tmp_path / name).touch()
    state.check(tmp_path, now, 1, tmp_path, {"transfer": 20, "lora": 60})  # no error
    with pytest.raises(LinconvError, match="--loss"):
        state.check(tmp_path, {**now, "loss": "kl"}, 1, tmp_path, {"transfer": 20, "lora": 60})
