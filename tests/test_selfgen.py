"""Self-generated training text: sampled once from the original model, cached on disk keyed by the
model, tokenizer and settings, reused and extended deterministically; mixed with other text by a
stated share of the tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import converted, tiny_model, tiny_tokenizer

import linconv.selfgen as selfgen
from linconv.data import mix_windows, parse_text_mix, tokenize, windows
from linconv.errors import LinconvError
from linconv.selfgen import SelfGenConfig, cache_key, prompt_texts, self_generated_text

CFG = SelfGenConfig(tokens=120, max_new_tokens=6, batch_size=3, seed=0)
CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"


@pytest.fixture
def counted(monkeypatch):
    """Counts the generate calls selfgen makes."""
    calls = []
    real = selfgen.generate

    def spy(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(selfgen, "generate", spy)
    return calls


def test_text_is_generated_once_then_read_from_the_cache(tmp_path, counted):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    first = self_generated_text(model, tok, CFG, cache=tmp_path)
    assert counted and first.new_tokens > 0 and first.tokens >= CFG.tokens and first.path.is_file()
    assert first.documents == len(counted) * CFG.batch_size
    stamp, calls = first.path.stat().st_mtime_ns, len(counted)
    again = self_generated_text(model, tok, CFG, cache=tmp_path)
    assert len(counted) == calls and again.new_tokens == 0  # nothing generated the second time
    assert first.path.stat().st_mtime_ns == stamp
    assert (again.text, again.tokens, again.seconds) == (first.text, first.tokens, first.seconds)


def test_a_larger_budget_extends_the_cache_and_a_smaller_reads_its_prefix(tmp_path, counted):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    small = self_generated_text(model, tok, CFG, cache=tmp_path / "a")
    big = self_generated_text(model, tok, SelfGenConfig(**{**vars(CFG), "tokens": 3 * CFG.tokens}), cache=tmp_path / "a")
    assert big.text.startswith(small.text) and big.tokens > small.tokens
    assert 0 < big.new_tokens < big.generated_tokens  # only the missing batches were sampled
    fresh = self_generated_text(model, tok, SelfGenConfig(**{**vars(CFG), "tokens": 3 * CFG.tokens}), cache=tmp_path / "b")
    assert fresh.text == big.text  # batch b is the same whatever ran before
    calls = len(counted)
    again = self_generated_text(model, tok, CFG, cache=tmp_path / "a")
    assert again.text == small.text and len(counted) == calls


def test_the_cache_is_keyed_by_model_tokenizer_and_settings(tmp_path):
    tok = tiny_tokenizer()
    a = self_generated_text(tiny_model("llama", seed=0), tok, CFG, cache=tmp_path)
    b = self_generated_text(tiny_model("llama", seed=1), tok, CFG, cache=tmp_path)  # same config, other weights
    assert a.path != b.path and a.text != b.text
    assert len(list(tmp_path.glob("*.json"))) == 2
    model = tiny_model("llama")
    hotter = SelfGenConfig(**{**vars(CFG), "temperature": 1.0})
    assert cache_key(model, tok, hotter) != cache_key(model, tok, CFG)
    assert cache_key(model, tok, SelfGenConfig(**{**vars(CFG), "tokens": 999})) == cache_key(model, tok, CFG)
    tok.chat_template = CHAT
    assert cache_key(model, tok, CFG) != cache_key(model, tiny_tokenizer(), CFG)


def test_a_converted_model_writes_as_its_original(tmp_path):
    tok = tiny_tokenizer()
    original = tiny_model("llama", eos_token_id=None)
    model = converted("llama")
    assert cache_key(model, tok, CFG) == cache_key(original, tok, CFG)  # the same file serves both
    ours = self_generated_text(model, tok, CFG, cache=tmp_path / "a")
    theirs = self_generated_text(original, tok, CFG, cache=tmp_path / "b")
    assert ours.text == theirs.text


def test_chat_template_formats_every_prompt(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    out = self_generated_text(tiny_model("llama"), tok, CFG, cache=tmp_path)
    docs = out.text.split("\n\n")
    assert len(docs) == out.documents
    prompts = prompt_texts(CFG.seed, 0, out.documents)
    assert all(d.startswith(f"<s>user: {p}</s><s>assistant:") for d, p in zip(docs, prompts))


def test_cache_folder_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LINCONV_CACHE", str(tmp_path / "c"))
    out = self_generated_text(tiny_model("llama"), tiny_tokenizer(), CFG)
    assert out.path.parent == tmp_path / "c" / "selfgen"


def test_prompts_are_varied_and_seeded():
    assert len(selfgen.TEMPLATES) >= 50 and len(selfgen.TOPICS) >= 50
    first = prompt_texts(0, 0, 200)
    assert len(set(first)) == 200
    assert prompt_texts(0, 100, 5) == first[100:105]
    assert prompt_texts(1, 0, 200) != first


def test_mixing_ratio_holds_in_token_counts(tmp_path):
    tok = tiny_tokenizer()
    generated = self_generated_text(tiny_model("llama"), tok, SelfGenConfig(**{**vars(CFG), "tokens": 600}), cache=tmp_path)
    L = 8
    own = windows(tokenize(tok, generated.text), L)
    plays = torch.arange(10_000).view(-1, L) + 1000  # ids that the tiny vocabulary never makes
    for share in (0.5, 0.25, 1.0):
        mixed = mix_windows([(plays, 1 - share), (own, share)], seed=0)
        from_own = int((mixed[:, 0] < 1000).sum())
        assert from_own * L / mixed.numel() == pytest.approx(share, abs=1 / mixed.shape[0])
        if share < 1:
            assert from_own == own.shape[0] or mixed.shape[0] - from_own == plays.shape[0]  # the scarce text is used up
    rows = {tuple(r) for r in mix_windows([(plays, 0.5), (own, 0.5)], seed=0).tolist()}
    assert len(rows) == 2 * own.shape[0]  # no window repeated


def test_text_mix_option_parsing():
    assert parse_text_mix("selfgen:0.5", ("selfgen",)) == {"selfgen": 0.5}
    assert parse_text_mix("selfgen:1", ("selfgen",)) == {"selfgen": 1.0}
    for bad in ("selfgen", "selfgen:0", "selfgen:1.5", "web:0.5", "selfgen:x", "selfgen:0.6,selfgen:0.3"):
        with pytest.raises(LinconvError, match="--text-mix"):
            parse_text_mix(bad, ("selfgen",))
    with pytest.raises(LinconvError, match="add up"):
        parse_text_mix("a:0.6,b:0.5", ("a", "b"))


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(LinconvError):
        self_generated_text(tiny_model("llama"), tiny_tokenizer(), SelfGenConfig(temperature=0), cache=tmp_path)
