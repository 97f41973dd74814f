"""``linconv convert`` from the command line: success on a tiny folder, and every error path."""

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from typer.testing import CliRunner

import linconv
from linconv.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["convert", *map(str, args)])


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny"
    save_tiny("llama", path)
    return path


def test_convert_writes_a_loadable_linconv_folder(tiny_src, tmp_path):
    out = tmp_path / "lin"
    result = invoke(tiny_src, out, "--group-size", 8, "--keep-softmax-layers", "1")
    assert result.exit_code == 0, result.output
    assert "layers converted" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "linconv-llama"
    assert config["linconv"]["group_size"] == 8 and config["linconv"]["keep_softmax_layers"] == [1]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "linconv.json").read_text())["source"] == str(tiny_src)
    model, tok = linconv.load(out)
    assert tok is not None and model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 96)


def test_recipe_presets_options_and_explicit_options_win(tiny_src, tmp_path):
    from linconv.recipes import RECIPES

    assert invoke(tiny_src, tmp_path / "paper", "--recipe", "paper", "--conv-kernel", 4).exit_code == 0
    cfg = json.loads((tmp_path / "paper" / "config.json").read_text())["linconv"]
    assert {k: cfg[k] for k in RECIPES["paper"].convert} == RECIPES["paper"].convert
    assert cfg["conv_kernel"] == 4
    assert json.loads((tmp_path / "paper" / "linconv.json").read_text())["recipe"] == "paper"
    assert invoke(tiny_src, tmp_path / "default", "--attention", "relu").exit_code == 0
    cfg = json.loads((tmp_path / "default" / "config.json").read_text())["linconv"]
    assert cfg["attention"] == "relu" and cfg["group_size"] == linconv.LinearizeConfig().group_size


def test_softmax_every_keeps_every_nth_layer(tiny_src, tmp_path):
    assert linconv.LinearizeConfig(softmax_every=5, keep_softmax_layers=[0]).kept_layers(30) == {0, 4, 9, 14, 19, 24, 29}
    result = invoke(tiny_src, tmp_path / "out", "--softmax-every", 2)
    assert result.exit_code == 0, result.output
    model, _ = linconv.load(tmp_path / "out")
    from linconv.convert import summarize

    assert summarize(model).kept == [1] and summarize(model).converted == [0]


def test_unmasked_conv_needs_permission(tiny_src, tmp_path):
    result = invoke(tiny_src, tmp_path / "out", "--unmasked-conv")
    assert result.exit_code == 1 and "an unmasked convolution is not causal" in result.output
    assert invoke(tiny_src, tmp_path / "out", "--unmasked-conv", "--allow-noncausal").exit_code == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["linconv"]["conv_mask"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "nope"], "unknown recipe 'nope'; choose from: linconv, hybrid, paper"),
        (["--attention", "nope"], "unknown attention variant 'nope'; choose from: relu, elu"),
        (["--attention", "linformer"], "not causal"),
        (["--group-size", "0"], "--group-size must be > 0"),
        (["--softmax-every", "-1"], "--softmax-every must be >= 0"),
        (["--conv-kernel", "-1"], "--conv-kernel must be >= 0"),
        (["--keep-softmax-layers", "7"], "out of range"),
        (["--dtype", "fp8"], "unknown dtype"),
    ],
)
def test_bad_options_are_one_line_errors(tiny_src, tmp_path, args, message):
    result = invoke(tiny_src, tmp_path / "out", *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_bad_sources_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for source, message in [(tmp_path / "missing", "no such file or folder"), (tmp_path / "empty", "config.json")]:
        result = invoke(source, tmp_path / "out")
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "bert"
    )
    result = invoke(tmp_path / "bert", tmp_path / "out")
    assert result.exit_code == 1 and "llama" in result.output and "gpt2" in result.output


def test_truncated_weights_are_reported(tiny_src, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_src, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = invoke(broken, tmp_path / "out")
    assert result.exit_code == 1 and "model.safetensors" in result.output
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_src, tmp_path):
    out = tmp_path / "lin"
    out.mkdir()
    result = invoke(tiny_src, out)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert invoke(tiny_src, out, "--overwrite").exit_code == 0
    assert (out / "config.json").is_file()


@pytest.mark.slow
def test_default_model_converts(tmp_path, record_property):
    """Converts the default model and records how long it took (a junit property) without failing
    on a loaded machine, where a wall-clock limit would."""
    import time

    pytest.importorskip("gguf")
    from linconv.sources import default_model_path

    try:
        default_model_path()
    except linconv.errors.LinconvError:
        pytest.skip("default model wheel not installed")
    start = time.perf_counter()
    result = invoke(tmp_path / "smol")
    record_property("seconds", round(time.perf_counter() - start, 1))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "smol" / "config.json").read_text())["num_hidden_layers"] == 30


def test_overwrite_replaces_a_file_or_a_link_and_leaves_no_sibling(tiny_src, tmp_path):
    (tmp_path / "file").write_text("old")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("file", "link"):
        result = invoke(tiny_src, tmp_path / name, "--overwrite")
        assert result.exit_code == 0, result.output
        assert (tmp_path / name / "config.json").is_file() and not (tmp_path / name).is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "target"]  # no .old, no temporary


def test_a_killed_save_is_cleaned_up_by_the_next_one_and_a_live_one_is_not(tmp_path):
    """A save killed mid-way leaves its unlocked temporary folder; the next save of the same output
    removes it once it is a minute old. A live save's folder is locked (flock) and stays."""
    import fcntl
    import os
    import tempfile

    from linconv.checkpoint import TMP_TAG, atomic_folder

    out = tmp_path / "lin"
    killed, live, fresh = (Path(tempfile.mkdtemp(prefix=f".lin{TMP_TAG}", dir=tmp_path)) for _ in range(3))
    (killed / "model.safetensors").write_bytes(b"half a model")
    for folder in (killed, live):
        os.utime(folder, (0, 0))  # long ago
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the lock a running save holds
    try:
        with atomic_folder(out) as tmp:
            (tmp / "x").write_text("done")
            probe = os.open(tmp, os.O_RDONLY)
            with pytest.raises(BlockingIOError):  # this save holds the lock on its own folder too
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.close(probe)
    finally:
        os.close(fd)
    assert not killed.exists() and live.is_dir() and fresh.is_dir() and (out / "x").is_file()
