"""The inference engine and ``linconv generate``: step decoding == parallel forward, transformers
``generate`` compatibility, constant state size, sampling, stop strings, batches, bad input."""

import pytest
import torch
from conftest import converted, save_tiny, tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import linconv
from linconv.attention.variants import VARIANTS
from linconv.checkpoint import save_checkpoint
from linconv.cli import app
from linconv.errors import LinconvError
from linconv.generate import IncrementalDecoder, generate

CAUSAL = [n for n, v in VARIANTS.items() if v.causal]
runner = CliRunner()


def softmax_model(arch="llama", seed=0, **overrides):
    torch.manual_seed(seed)
    overrides = {"eos_token_id": None, **overrides}
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="sdpa").eval()


def prompt(n, seed=0):
    return torch.randint(4, 90, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- step decoding == one parallel forward -------------------------------------------------------


@pytest.mark.parametrize("variant", CAUSAL)
@torch.inference_mode()
def test_engine_logits_equal_one_parallel_forward(variant):
    """Chunked prefill (chunks crossing group boundaries) + step decoding == a forward over all tokens."""
    model = converted("llama", variant)
    ids = prompt(11)
    res = generate(model, ids, max_new_tokens=8, prefill_chunk=3, keep_logits=True)
    full = model(torch.tensor([ids + res.tokens[0]]), use_cache=False).logits[0]
    steps = torch.cat(res.logits)  # [8, V]: the logits each token was chosen from
    torch.testing.assert_close(steps, full[len(ids) - 1 : -1], atol=1e-5, rtol=1e-4)
    assert res.tokens[0] == steps.argmax(-1).tolist()


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("variant", ["augmented", "hedgehog"])
@torch.inference_mode()
def test_engine_greedy_equals_full_recompute_loop(arch, variant):
    model = converted(arch, variant, keep_softmax_layers=[1])  # a hybrid: one softmax layer kept
    ids = prompt(9, seed=1)
    seq = torch.tensor([ids])
    for _ in range(10):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert generate(model, ids, max_new_tokens=10, prefill_chunk=4).tokens[0] == seq[0, 9:].tolist()


# --- transformers generate --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linconv", "softmax"])
@torch.inference_mode()
def test_engine_greedy_equals_transformers_generate(kind):
    model = converted("llama") if kind == "linconv" else softmax_model("llama")
    ids = prompt(13, seed=2)
    hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    res = generate(model, ids, max_new_tokens=12, prefill_chunk=5)
    assert res.tokens[0] == hf[0, 13:].tolist()
    assert res.finish_reasons == ["max_new_tokens"]
    assert len(res.token_seconds) == 11 and res.decode_tokens == 11 and res.prefill_seconds > 0


@torch.inference_mode()
def test_prefill_is_chunked_and_computes_last_logits_only():
    model = converted("llama")
    seen = {"layer": [], "head": []}
    hooks = [
        model.model.layers[0].register_forward_hook(lambda m, a, o: seen["layer"].append(a[0].shape[1])),
        model.lm_head.register_forward_hook(lambda m, a, o: seen["head"].append(a[0].numel() // a[0].shape[-1])),  # positions
    ]
    generate(model, prompt(50), max_new_tokens=3, prefill_chunk=16)
    for h in hooks:
        h.remove()
    assert seen["layer"] == [16, 16, 16, 2, 1, 1]
    assert seen["head"] == [1] * 3  # full-vocabulary logits for one position after the prefill and per step, never per prompt token


# --- the compiled step ------------------------------------------------------------------------------


@pytest.mark.slow  # compiling takes minutes on a CPU
@pytest.mark.parametrize("sinks,prompt_tokens", [(0, 7), (3, 3), (4, 3)])  # sinks: the compiled steps finish the first group
@torch.inference_mode()
def test_compiled_step_equals_eager_steps_one_forward_and_speculation(sinks, prompt_tokens):
    from conftest import state_contents

    from linconv.compiled import compiled_decode_step
    from linconv.speculative.decode import speculative_generate
    from linconv.speculative.drafts import PromptLookup

    model = converted("llama", group_size=4, conv_kernel=3, sinks=sinks)  # 12 steps cross three group boundaries
    ids = prompt(prompt_tokens)
    eager = generate(model, ids, max_new_tokens=12, keep_logits=True)
    comp = generate(model, ids, max_new_tokens=12, keep_logits=True, compile=True)
    assert comp.tokens == eager.tokens
    full = model(torch.tensor([ids + comp.tokens[0]]), use_cache=False).logits[0]
    torch.testing.assert_close(torch.cat(comp.logits), full[len(ids) - 1 : -1], atol=1e-5, rtol=1e-4)
    cache, plain = model.new_cache(), model.new_cache()
    model(torch.tensor([ids]), cache=cache)
    for i, token in enumerate(comp.tokens[0][:-1]):
        compiled_decode_step()(model, torch.tensor([[token]]), torch.tensor([[len(ids) + i]]), cache)
    model(torch.tensor([ids + comp.tokens[0][:-1]]), cache=plain)
    for a, b in zip(state_contents(cache), state_contents(plain)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert speculative_generate(model, ids, PromptLookup(num_tokens=4), max_new_tokens=12).tokens == comp.tokens[0]
    softmax = softmax_model("llama")
    assert generate(softmax, ids, max_new_tokens=12, compile=True).tokens == generate(softmax, ids, max_new_tokens=12).tokens


def test_compile_plan_falls_back_to_eager_without_a_compiler(monkeypatch):
    import linconv.compiled as C

    assert C.compile_plan("cpu", None) == (False, None) and C.compile_plan("cpu", False) == (False, None)
    monkeypatch.setattr(C.shutil, "which", lambda name: "/usr/bin/" + name)
    assert C.compile_plan("cpu", True) == (True, None)
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    use, note = C.compile_plan("cpu", True)
    assert not use and note.startswith("--compile: no C++ compiler") and note.endswith("decoding eagerly")


# --- memory ----------------------------------------------------------------------------------------


@torch.inference_mode()
def test_state_size_is_constant_in_context_length():
    """The state (group buffer included: whole-group slots, allocated once) has one size at any length."""
    model = converted("llama", group_size=64, conv_kernel=32)  # the paper's G and K
    sizes = {}
    for n in (2048, 1024 + 5, 4096 + 5, 1024 + 63, 4096 + 40):  # residues 0, 5, 5, 63, 40 mod G
        res = generate(model, prompt(n), max_new_tokens=3, prefill_chunk=1024)
        sizes[n] = (res.state_bytes_prefill, res.state_bytes_end)
    assert len(set(sizes.values())) == 1, sizes
    kv = generate(softmax_model("llama"), prompt(100), max_new_tokens=3).state_bytes_end
    assert kv == 2 * 2 * 2 * (100 + 2) * 8 * 4  # k+v, layers, kv heads, tokens, head dim, fp32: grows with T


@torch.inference_mode()
def test_state_does_not_pin_the_prefill_chunk():
    """The group buffer and conv tail left by a long chunk are copies, not views into the whole chunk."""
    model = converted("llama", group_size=64, conv_kernel=32)
    cache = model.new_cache()
    model(torch.tensor([prompt(1000 + 5)]), cache=cache, use_cache=True, logits_to_keep=1)
    for state in cache.states:
        for t in state.tensors():
            assert t.untyped_storage().nbytes() <= 2 * t.numel() * t.element_size()


def peak_tensor_bytes(fn) -> int:
    """Peak bytes of tensors alive at once while ``fn`` runs (those allocated before are not counted)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = live = 0
    for _, delta in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage):
        live += delta
        peak = max(peak, live)
    return peak


def test_chunked_prefill_memory_does_not_grow_with_the_prompt():
    model = converted("llama", group_size=64, conv_kernel=32)
    peaks = [peak_tensor_bytes(lambda n=n: generate(model, prompt(n), max_new_tokens=1, prefill_chunk=256)) for n in (1024, 4096)]
    assert peaks[1] <= 1.05 * peaks[0], peaks


# --- sampling and stopping -------------------------------------------------------------------------


@torch.inference_mode()
def test_sampling_with_a_seed_is_reproducible():
    model = converted("llama")
    kw = dict(max_new_tokens=20, temperature=1.5, top_k=40, top_p=0.95)
    a, b = (generate(model, prompt(7), seed=123, **kw).tokens for _ in range(2))
    c = generate(model, prompt(7), seed=124, **kw).tokens
    assert a == b and a != c
    greedy = generate(model, prompt(7), max_new_tokens=20).tokens
    assert generate(model, prompt(7), max_new_tokens=20, temperature=1.0, top_k=1, seed=5).tokens == greedy


def test_top_p_and_top_k_restrict_the_candidates():
    from linconv.generate import Sampler

    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]]).repeat(200, 1)
    assert set(Sampler(1.0, top_k=2, seed=0)(logits).tolist()) == {0, 1}
    assert set(Sampler(1.0, top_p=0.5, seed=0)(logits).tolist()) == {0}  # p(0) = 0.66 already reaches 0.5
    assert set(Sampler(1.0, top_p=0.9, seed=0)(logits).tolist()) == {0, 1}


@torch.inference_mode()
def test_stop_tokens_and_stop_strings():
    model, tok = converted("llama"), tiny_tokenizer()
    ids = tok("hello world")["input_ids"]
    free = generate(model, ids, max_new_tokens=12, tokenizer=tok)
    text = free.texts[0]
    assert free.finish_reasons == ["max_new_tokens"] and text
    # a stop token: the engine stops at its first occurrence and keeps it as the last token
    stop_tok = free.tokens[0][4]
    res = generate(model, ids, max_new_tokens=12, stop_token_ids=[stop_tok], tokenizer=tok)
    assert res.tokens[0] == free.tokens[0][: free.tokens[0].index(stop_tok) + 1] and res.finish_reasons == ["stop_token"]
    # a stop string spanning a token boundary: text cut before it; streamed text == final text
    stop = text[len(text) // 2 - 1 : len(text) // 2 + 2]
    streamed = []
    res = generate(
        model, ids, max_new_tokens=12, stop_strings=["zzz-never", stop], tokenizer=tok, on_token=lambda r, t, s: streamed.append(s)
    )
    assert res.finish_reasons == ["stop_string"] and res.texts[0] == text[: text.index(stop)]
    assert "".join(streamed) == res.texts[0] and len(streamed) == len(res.tokens[0])
    assert res.tokens[0] == free.tokens[0][: len(res.tokens[0])] and len(res.tokens[0]) < 12


def test_incremental_decoding_never_splits_a_character():
    tok = tiny_tokenizer()

    class Bytes:  # a byte-level tokenizer: one UTF-8 byte per id
        def decode(self, ids, skip_special_tokens=False):
            return bytes(ids).decode("utf-8", errors="replace")

    dec = IncrementalDecoder(Bytes())
    pieces = [dec.push(b) for b in "aé€b".encode()]
    assert pieces == ["a", "", "é", "", "", "€", "b"] and dec.text == "aé€b"
    ids = tok("the quick brown fox")["input_ids"]
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(i) for i in ids) == tok.decode(ids)


# --- batches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linconv", "softmax"])
@pytest.mark.parametrize("lengths", [(5, 12, 8), (7, 7)])
@torch.inference_mode()
def test_batch_equals_each_prompt_alone(kind, lengths):
    model = converted("llama") if kind == "linconv" else softmax_model("llama")
    prompts = [prompt(n, seed=i) for i, n in enumerate(lengths)]
    batch = generate(model, prompts, max_new_tokens=6, prefill_chunk=4)
    alone = [generate(model, p, max_new_tokens=6).tokens[0] for p in prompts]
    assert batch.tokens == alone
    assert batch.prompt_tokens == list(lengths) and batch.decode_tokens == 5 * len(lengths)


@torch.inference_mode()
def test_batch_rows_stop_independently():
    model = converted("llama")
    prompts = [prompt(6, seed=0), prompt(6, seed=1)]
    alone = [generate(model, p, max_new_tokens=8).tokens[0] for p in prompts]
    stop = alone[0][2]
    res = generate(model, prompts, max_new_tokens=8, stop_token_ids=[stop])
    for row, free in zip(res.tokens, alone):
        assert row == (free[: free.index(stop) + 1] if stop in free else free)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "the prompt is empty"),
        (dict(prompts=[[5, 6], []]), "prompt 1 is empty"),
        (dict(max_new_tokens=0), "--max-new-tokens must be > 0"),
        (dict(max_new_tokens=-3), "--max-new-tokens must be > 0"),
        (dict(temperature=-1.0), "--temperature must be >= 0"),
        (dict(top_p=1.5), "--top-p must be in (0, 1]"),
        (dict(top_k=0), "--top-k must be > 0"),
        (dict(stop_strings=["x"]), "stop strings need a tokenizer"),
    ],
)
def test_bad_arguments_are_linconv_errors(kwargs, message):
    kwargs = {"prompts": [5, 6, 7], **kwargs}
    with pytest.raises(LinconvError, match=message.replace("(", r"\(").replace("]", r"\]")):
        generate(converted("llama"), **kwargs)


def test_softmax_context_limit():
    model = softmax_model("llama")  # max_position_embeddings = 128
    with pytest.raises(LinconvError, match="the prompt has 129 tokens but the model's context limit is 128"):
        generate(model, prompt(129))
    res = generate(model, prompt(120), max_new_tokens=50)
    assert res.finish_reasons == ["context_limit"] and len(res.tokens[0]) == 8
    linear = generate(converted("llama"), prompt(200), max_new_tokens=3)  # rotary linconv: no limit
    assert linear.finish_reasons == ["max_new_tokens"]


# --- CLI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    save_checkpoint(converted("llama"), tiny_tokenizer(), path, card={})
    return path


def invoke(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def test_cli_streams_text_and_reports_speed(checkpoint):
    result = invoke(checkpoint, "--prompt", "hello world", "--max-new-tokens", 6, "--device", "cpu")
    assert result.exit_code == 0, result.output
    model, tok = linconv.load(checkpoint)
    expected = generate(model, tok("hello world")["input_ids"], max_new_tokens=6, tokenizer=tok)
    assert result.stdout.startswith(expected.texts[0])
    assert (
        f"prompt {len(tok('hello world')['input_ids'])} tokens · generated 6 tokens" in result.stderr
        and "decode" in result.stderr
        and "state" in result.stderr
    )


def test_cli_compile_without_a_compiler_notes_it_and_decodes_eagerly(checkpoint, monkeypatch):
    import linconv.compiled as C

    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    eager = invoke(checkpoint, "--prompt", "hello world", "--max-new-tokens", 4, "--device", "cpu")
    result = invoke(checkpoint, "--prompt", "hello world", "--max-new-tokens", 4, "--device", "cpu", "--compile")
    assert result.exit_code == 0, result.output
    assert "--compile: no C++ compiler (g++, c++, clang++) found; decoding eagerly" in result.stderr
    assert result.stdout == eager.stdout


def test_cli_prompt_file_sampling_and_stop(checkpoint, tmp_path):
    (tmp_path / "p.txt").write_text("the quick brown fox")
    args = [
        checkpoint,
        "--prompt-file",
        tmp_path / "p.txt",
        "--max-new-tokens",
        10,
        "--temperature",
        0.8,
        "--top-k",
        20,
        "--top-p",
        0.9,
        "--seed",
        3,
        "--no-chat",
    ]
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    text = first.stdout.rstrip("\n")
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # fires in the middle of the text
    stopped = invoke(*args, "--stop", "never-there", "--stop", stop)
    assert stopped.exit_code == 0 and stopped.stdout == text[: text.index(stop)] + "\n", (text, stop, stopped.stdout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "the prompt is empty"),
        ([], "give exactly one of --prompt TEXT or --prompt-file FILE"),
        (["--prompt", "a", "--prompt-file", "x.txt"], "give exactly one of"),
        (["--prompt-file", "/nonexistent/p.txt"], "cannot read --prompt-file"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
        (["--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompt", "hi", "--chat"], "the tokenizer has no chat template"),
        (["--prompt", "hi", "--dtype", "fp8"], "unknown dtype"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(checkpoint, args, message):
    result = invoke(checkpoint, *args)
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]  # lines before it: transformers' loading progress bar
    assert last.startswith("error:") and message in last and "Traceback" not in result.output


def test_cli_refuses_a_folder_that_is_not_linconv(tmp_path):
    save_tiny("llama", tmp_path / "plain")
    (tmp_path / "empty").mkdir()
    for folder, message in [
        (tmp_path / "plain", "not a linconv checkpoint"),
        (tmp_path / "empty", "no config.json"),
        (tmp_path / "missing", "does not exist"),
    ]:
        result = invoke(folder, "--prompt", "hi")
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output


def test_cli_usage_error_exits_non_zero():
    assert invoke("--max-new-tokens", "many").exit_code == 1  # one line, like every bad input
