"""``linconv finetune --draft-head eagle``: the EAGLE stage trains a head on the fine-tuned model that
`--draft eagle` loads with its measured tree, speculation with it is plain greedy, resume is exact,
bad options are one line. The Medusa stage measures and stores its tree the same way."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import _CORPUS, converted, tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from test_finetune import Interrupter, changed, weights
from typer.testing import CliRunner

import linconv
from linconv.checkpoint import save_checkpoint
from linconv.cli import app
from linconv.finetune import FinetuneConfig, finetune, resume_folder
from linconv.speculative.decode import speculative_generate
from linconv.speculative.drafts import make_draft
from linconv.speculative.eagle import EagleHead

runner = CliRunner()
FAST = {"draft_prompts": 4, "draft_new_tokens": 16, "draft_vocab": 32}  # 4 sequences of 64 + 16 tokens; 32 of 96 tokens


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A converted tiny llama checkpoint and a training text."""
    root = tmp_path_factory.mktemp("fte")
    model = linconv.convert(tiny_model("llama"), linconv.LinearizeConfig(group_size=4, conv_kernel=3))
    save_checkpoint(model, tiny_tokenizer(), root / "llama", card={"made_by": "test"})
    (root / "text.txt").write_text(("\n".join(_CORPUS) + "\n") * 12)
    return root


def config(data, **kw) -> FinetuneConfig:
    options = {"text": str(data / "text.txt"), "seq_len": 16, "batch_size": 2, "transfer_steps": 0, "lora_steps": 2}
    return FinetuneConfig(**{**options, "draft_head": "eagle", "draft_shape_prompts": 0, **FAST, **kw})


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers alias
def test_eagle_stage_saves_a_head_with_its_tree_that_speculates_plain_greedy(data, tmp_path):
    out = tmp_path / "out"
    result = finetune(data / "llama", out, config(data, draft_steps=3, draft_shape_prompts=1), device="cpu")
    assert [(s.name, s.steps, len(s.losses)) for s in result.stages] == [("lora", 2, 2), ("eagle", 3, 3)]
    assert result.eagle == out / "eagle.safetensors" and result.eagle.is_file()
    assert result.stages[-1].tokens == 3 * 4 * (64 + 16)  # batches of 4 distilled sequences
    stored = json.loads((out / "eagle.json").read_text())
    assert stored["training"]["steps"] == 3 and stored["training"]["prompts"] == 4
    assert stored["tree"]["widths"] and stored["tree"]["positions"] > 0
    assert json.loads((out / "linconv.json").read_text())["draft_head"] == "eagle"
    model, tokenizer = linconv.load(out)
    draft = make_draft("eagle", model, tokenizer, str(out))
    assert draft.widths == stored["tree"]["widths"]
    assert draft.head.vocab.numel() == stored["vocab_size"] == 32
    prompt = tokenizer("the quick brown fox jumps over the lazy", add_special_tokens=False)["input_ids"]
    plain = speculative_generate(model, prompt, None, max_new_tokens=16).tokens
    assert (
        speculative_generate(model, prompt, make_draft("eagle", model, tokenizer, str(out), tree_widths=[4, 2]), max_new_tokens=16).tokens
        == plain
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_medusa_stage_stores_its_measured_tree_and_medusa_drafts_use_it(data, tmp_path):
    out = tmp_path / "out"
    finetune(data / "llama", out, config(data, draft_head=None, medusa_heads=2, medusa_steps=2, draft_shape_prompts=1), device="cpu")
    tree = json.loads((out / "medusa.json").read_text())["tree"]
    assert len(tree["widths"]) <= 2 and tree["positions"] > 0 and set(tree["cost"]["verify_s"]) >= {"1", "2", "4"}
    model, tokenizer = linconv.load(out)
    draft = make_draft("medusa", model, tokenizer, str(out))
    assert draft.widths == (tree["widths"] or [4, 2])  # an empty best tree (no draft pays) leaves the default
    prompt = tokenizer("the quick brown fox jumps over the lazy", add_special_tokens=False)["input_ids"]
    plain = speculative_generate(model, prompt, None, max_new_tokens=16).tokens
    assert speculative_generate(model, prompt, draft, max_new_tokens=16).tokens == plain
    finetune(data / "llama", tmp_path / "none", config(data, draft_head=None, medusa_heads=2, medusa_steps=2), device="cpu")
    assert "tree" not in json.loads((tmp_path / "none" / "medusa.json").read_text())  # --draft-shape-prompts 0


def test_eagle_stage_alone_trains_the_head_and_leaves_the_model(data, tmp_path):
    result = finetune(data / "llama", tmp_path / "out", config(data, lora_steps=0, draft_steps=12, draft_lr=1e-2, warmup=0.0), device="cpu")
    [eagle] = result.stages
    assert sum(eagle.losses[-3:]) < sum(eagle.losses[:3]), eagle.losses
    assert not changed(weights(data / "llama"), weights(tmp_path / "out"))
    assert "tree" not in json.loads((tmp_path / "out" / "eagle.json").read_text())  # --draft-shape-prompts 0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_eagle_resume_is_identical_to_an_uninterrupted_run(data, tmp_path):
    """Interrupted in LoRA, inside the EAGLE stage (its data distilled again from the restored model)
    and after its last step (the head's draft vocabulary comes back with the resume state)."""
    cfg = config(data, lora_steps=3, lr=1e-2, draft_steps=4, save_every=2)
    straight = finetune(data / "llama", tmp_path / "a", cfg, device="cpu")
    out = tmp_path / "b"
    for at in [("lora", 2), ("eagle", 1), ("eagle", 4)]:
        with pytest.raises(KeyboardInterrupt):
            finetune(data / "llama", out, cfg, device="cpu", resume=resume_folder(out).exists(), progress=Interrupter([at]))
        progress = json.loads((resume_folder(out) / "progress.json").read_text())
        assert (progress["stage"], progress["step"]) == at and not out.exists()
    resumed = finetune(data / "llama", out, cfg, device="cpu", resume=True)
    assert not changed(weights(tmp_path / "a"), weights(out))
    a, b = (load_file(str(folder / "eagle.safetensors")) for folder in (tmp_path / "a", out))
    assert "vocab" in a and not changed(a, b)
    assert [s.losses for s in resumed.stages] == [s.losses for s in straight.stages]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_cli_trains_a_head_that_generate_draft_eagle_uses(data, tmp_path):
    out = tmp_path / "out"
    args = ["--text", data / "text.txt", "--seq-len", 16, "--transfer-steps", 0, "--lora-steps", 1, "--device", "cpu"]
    draft = ["--draft-head", "eagle", "--draft-steps", 3, "--draft-prompts", 4, "--draft-new-tokens", 16, "--draft-shape-prompts", 0]
    result = runner.invoke(app, ["finetune", *map(str, [data / "llama", out, *args, *draft])])
    assert result.exit_code == 0, result.output
    assert "eagle" in result.output and "EAGLE head" in result.output
    assert (out / "eagle.safetensors").is_file() and (out / "eagle.json").is_file()
    gen = ["generate", str(out), "--prompt", "the quick brown fox the quick brown", "--max-new-tokens", "8"]
    plain = runner.invoke(app, gen)
    spec = runner.invoke(app, [*gen, "--spec-decode", "--draft", "eagle"])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert len(plain.stdout.strip()) > 8 and spec.stdout == plain.stdout


@pytest.mark.parametrize(
    "options, says",
    [
        (["--draft-head", "nope"], "unknown --draft-head 'nope'; choose from: eagle"),
        (["--draft-head", "eagle", "--draft-steps", "-1"], "--draft-steps must be >= 0, got -1"),
        (["--draft-head", "eagle", "--draft-lr", "0"], "--draft-lr must be > 0 and finite"),
        (["--draft-head", "eagle", "--draft-prompts", "0"], "--draft-prompts must be > 0"),
        (["--draft-head", "eagle", "--draft-text-windows", "-1"], "--draft-text-windows must be >= 0, got -1"),
    ],
)
def test_bad_draft_options_are_one_line_errors(data, tmp_path, options, says):
    result = runner.invoke(app, ["finetune", str(data / "llama"), str(tmp_path / "out"), "--device", "cpu", *options])
    assert result.exit_code == 1 and says in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_head_made_under_peft_starts_as_the_models_last_block():
    """After the LoRA stage the projections are peft layers (``q_proj.base_layer.weight``): the new
    head still copies them, not a random init."""
    from peft import LoraConfig, get_peft_model

    model = converted("llama")
    plain = EagleHead.for_model(model).decoder.state_dict()
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    under_peft = EagleHead.for_model(model).decoder.state_dict()
    assert plain.keys() == under_peft.keys()
    assert all(torch.equal(plain[k], under_peft[k]) for k in plain)
