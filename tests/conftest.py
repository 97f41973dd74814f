"""Shared test helpers: tiny random causal LMs and a tiny tokenizer, built offline.

Import the helpers directly (``from conftest import save_tiny``) or use the
``tiny_dir`` fixture. Everything is small enough that a model loads in well under
a second, so tests that need a real Hugging Face folder stay fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

TINY_VOCAB = 96
TINY_ARCHS = ("llama", "mistral", "qwen2", "gpt2")

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "linear attention replaces softmax with a kernel feature map",
    "hello world, this is a tiny tokenizer for tests.",
    "0 1 2 3 4 5 6 7 8 9 + - = ? !",
]
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def tiny_config(arch: str, **overrides) -> PreTrainedConfig:
    """A 2-layer, 32-wide config of family ``arch`` (llama, mistral, qwen2 or gpt2)."""
    if arch == "gpt2":
        kw = dict(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)
        kw.update(overrides)
        return GPT2Config(**kw)
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if arch not in classes:
        raise ValueError(f"no tiny config for {arch!r}; known: {', '.join(TINY_ARCHS)}")
    kw = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kw.update(overrides)
    return classes[arch](**kw)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on a few sentences; at most TINY_VOCAB ids, ids 0-3 are specials."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=_SPECIALS, show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(arch: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny causal LM in eval mode (float32, CPU)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="sdpa")
    return model.eval()


def save_tiny(arch: str, path: str | Path, seed: int = 0, **overrides) -> PreTrainedModel:
    """Write a tiny model plus tokenizer to ``path`` (a normal HF folder); return the model."""
    path = Path(path)
    model = tiny_model(arch, seed=seed, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def converted(arch: str = "llama", variant: str | None = None, seed: int = 0, **options):
    """A converted tiny model (eos off) whose new parameters are moved away from their (often zero)
    init, so that tests exercise every term: conv kernels, α, feature maps. ``variant`` None is the
    shipped default (``LinearizeConfig()``), with groups and a conv small enough for tiny sequences."""
    import linconv
    from linconv.models.hf import linconv_tensor_names

    options = {"group_size": 4, "conv_kernel": 3, **options}
    if variant is not None:
        options["attention"] = variant
    model = linconv.convert(tiny_model(arch, seed, eos_token_id=None), linconv.LinearizeConfig(allow_noncausal=True, **options))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in linconv_tensor_names(model):
            if name in params:
                params[name].add_(0.2 * torch.randn(params[name].shape, generator=g))
    return model


def state_contents(cache) -> list[torch.Tensor]:
    """The tensors that carry a LinconvCache's information: a group buffer only up to its fill (the
    slots after it hold stale keys of an earlier group), the sinks once they are held."""
    from linconv.ops import GroupState

    out = []
    for state in cache.states:
        attn = state.attn
        if isinstance(attn, GroupState):
            out += [
                attn.S,
                attn.z,
                attn.keys(),
                attn.values(),
                torch.tensor(attn.fill),
                attn.sinks_on,
                attn.sink_keys(),
                attn.sink_values(),
            ]
        elif attn is not None:
            out += [t for t in attn if t is not None]
        if state.conv is not None:
            out.append(state.conv)
    return out


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU their spin-waits cost 20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_dir(tmp_path):
    """Factory fixture: ``tiny_dir("qwen2")`` saves a tiny model under tmp_path and returns the folder."""

    def make(arch: str = "llama", name: str | None = None, **overrides) -> Path:
        path = tmp_path / (name or f"tiny-{arch}")
        save_tiny(arch, path, **overrides)
        return path

    return make
