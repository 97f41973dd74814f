"""Speculative decoding: identical greedy output, identical final state, every draft and variant."""

import random

import pytest
import torch
from conftest import converted, tiny_config, tiny_tokenizer
from test_model import CAUSAL
from transformers import AutoModelForCausalLM

from linconv.attention.state import new_cache
from linconv.errors import LinconvError
from linconv.generate import generate
from linconv.speculative.decode import speculative_generate
from linconv.speculative.drafts import DraftModel, PromptLookup
from linconv.speculative.tree import CandidateTree

PROMPT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9]


class OracleDraft:
    """Proposes the true greedy continuation (known in advance) among random wrong branches, so
    that long paths are accepted and trees cross group boundaries at every offset."""

    def __init__(self, truth, depth=5, branches=3, seed=0):
        self.truth, self.depth, self.branches = truth, depth, branches
        self.rng = random.Random(seed)

    def propose(self, context, hidden=None):
        done = len(context) - len(PROMPT)  # tokens of the truth already committed, root included
        right = self.truth[done : done + self.depth]
        depth = self.rng.randint(0, len(right))
        paths = [right[:depth]]
        for _ in range(self.branches):
            k = self.rng.randint(0, depth)
            paths.append(right[:k] + [self.rng.randrange(90) for _ in range(self.rng.randint(1, 3))])
        return paths


def greedy(model, n):
    return speculative_generate(model, PROMPT, None, max_new_tokens=n).tokens


@pytest.mark.parametrize("variant", CAUSAL)
def test_speculative_output_is_greedy_output_for_every_variant(variant):
    model = converted("llama", variant, group_size=4, conv_kernel=5)
    truth = greedy(model, 24)
    ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False)[0, len(PROMPT) :].tolist()
    assert truth == ref
    for draft in (OracleDraft(truth), PromptLookup(num_tokens=4), DraftModel(converted("llama", "relu"), 3)):
        result = speculative_generate(model, PROMPT, draft, max_new_tokens=24)
        assert result.tokens == truth
    assert sum(speculative_generate(model, PROMPT, OracleDraft(truth), max_new_tokens=24).accepted) > 10


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_softmax_and_hybrid_models_verify_trees_too(arch):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(arch, eos_token_id=None)).eval()
    hybrid = converted(arch, keep_softmax_layers=[1], group_size=4)
    for model in (base, hybrid):
        truth = greedy(model, 16)
        assert truth == model.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, len(PROMPT) :].tolist()
        assert speculative_generate(model, PROMPT, OracleDraft(truth), max_new_tokens=16).tokens == truth


@torch.inference_mode()
def test_state_after_speculation_equals_state_after_plain_decoding():
    from linconv.speculative import verify as V

    model = converted("llama", group_size=4, conv_kernel=5)
    truth = greedy(model, 12)
    draft = OracleDraft(truth, depth=6, seed=3)
    # speculative: verify + commit, keeping the cache
    spec = new_cache(model)
    out = model(torch.tensor([PROMPT]), cache=spec)
    logits, past, context = out.logits[0, -1], len(PROMPT), list(PROMPT)
    while past < len(PROMPT) + 12:
        root = int(logits.argmax())
        tree = CandidateTree.from_paths(root, draft.propose([*context, root]))
        _, tree_logits = V.verify(model, spec, tree, past)
        path = V.accept_greedy(tree, tree_logits)
        V.commit(model, spec, past, path)
        context += [tree.tokens[n] for n in path]
        past += len(path)
        logits = tree_logits[path[-1]]
    plain = new_cache(model)
    model(torch.tensor([context]), cache=plain)
    for a, b in zip(spec.states, plain.states):
        for x, y in zip(a.tensors(), b.tensors()):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert spec.lengths == plain.lengths


@torch.inference_mode()
def test_a_rolled_back_tree_leaves_no_trace():
    from linconv.speculative import verify as V

    model = converted("llama", keep_softmax_layers=[1], group_size=4, conv_kernel=5)  # a linear and a softmax layer
    cache = new_cache(model)
    model(torch.tensor([PROMPT]), cache=cache)
    states, lengths = cache.snapshot()
    V.verify(model, cache, CandidateTree.from_paths(5, [[6, 7, 8], [9]]), len(PROMPT))
    assert cache.tree is not None and cache.get_seq_length(1) == len(PROMPT) + 5  # the softmax layer holds the nodes
    cache.rollback()
    assert cache.tree is None and cache.lengths == lengths
    for a, b in zip(cache.states, states):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def test_candidate_tree_merges_shared_prefixes():
    tree = CandidateTree.from_paths(7, [[1, 2], [1, 3], [4]])
    assert tree.tokens == [7, 1, 2, 3, 4] and tree.parents == [-1, 0, 1, 1, 0]


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    assert PromptLookup(num_tokens=3).propose([1, 2, 3, 4, 5, 1, 2]) == [[3, 4, 5]]
    assert PromptLookup().propose([1, 2, 3]) == []


def test_bad_speculative_input_is_refused():
    model = converted("llama")
    with pytest.raises(LinconvError, match="positive"):
        PromptLookup(max_candidates=0)
    with pytest.raises(LinconvError, match="empty"):
        speculative_generate(model, [], None)
    with pytest.raises(LinconvError, match="> 0"):
        speculative_generate(model, PROMPT, None, max_new_tokens=0)


def test_medusa_tree_gives_greedy_output_and_checks_widths():
    from linconv.speculative.drafts import MedusaDraft
    from linconv.speculative.medusa import MedusaHeads

    model = converted("llama", group_size=4, conv_kernel=5)
    heads = MedusaHeads.for_model(model, num_heads=3)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    truth = greedy(model, 16)
    result = speculative_generate(model, PROMPT, MedusaDraft(heads, [3, 2, 2]), max_new_tokens=16)
    assert result.tokens == truth and max(result.offered) == 3
    with pytest.raises(LinconvError, match="positive"):
        MedusaDraft(heads, [2, 0])
    with pytest.raises(LinconvError, match="3 Medusa heads"):
        MedusaDraft(heads, [1, 1, 1, 1])


def test_spec_bench_point_reports_identical_output_and_acceptance():
    from linconv.bench.speculative import spec_decode_point, spec_prompts

    model = converted("llama", group_size=4)
    prompts = spec_prompts(list(range(4, 60)) * 4, length=40)
    point = spec_decode_point(model, "linearized", "grounded", prompts["grounded"], PromptLookup(num_tokens=4), new_tokens=12)
    assert point.identical and point.new_tokens == 12 and 0 <= point.acceptance_rate <= 1
    assert sum(point.histogram.values()) >= 1 and point.to_dict()["speedup"] > 0


def test_generate_cli_speculative(tmp_path):
    from conftest import save_tiny
    from typer.testing import CliRunner

    from linconv.checkpoint import save_checkpoint
    from linconv.cli import app

    save_tiny("llama", tmp_path / "src")
    from transformers import AutoTokenizer

    save_checkpoint(converted("llama"), AutoTokenizer.from_pretrained(tmp_path / "src"), tmp_path / "lin", card={})
    runner = CliRunner()
    args = ["generate", str(tmp_path / "lin"), "--prompt", "the quick brown fox the quick brown", "--max-new-tokens", "6"]
    plain = runner.invoke(app, args)
    spec = runner.invoke(app, [*args, "--spec-decode"])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert "per step" in spec.output
    sampled = runner.invoke(app, [*args, "--spec-decode", "--temperature", "0.7", "--seed", "1"])
    assert sampled.exit_code == 0 and "per step" in sampled.output
    bad = [
        ([*args, "--spec-decode", "--draft", "medusa"], "no Medusa heads"),
        ([*args, "--spec-decode", "--draft", "nope"], "unknown draft"),
        ([*args, "--spec-decode", "--tree-widths", "0"], "positive"),
    ]
    other = AutoTokenizer.from_pretrained(tmp_path / "src")
    other.add_tokens(["zzzz"])
    save_tiny("llama", tmp_path / "draft")
    other.save_pretrained(tmp_path / "draft")
    bad.append(([*args, "--spec-decode", "--draft", f"model:{tmp_path / 'draft'}"], "does not use the target's tokenizer"))
    for argv, message in bad:
        result = runner.invoke(app, argv)
        assert result.exit_code == 1 and message in result.output, (argv, result.output)


def test_generate_cli_speculative_streams_and_stops_like_plain_decoding(tmp_path):
    from typer.testing import CliRunner

    from linconv.checkpoint import save_checkpoint
    from linconv.cli import app

    save_checkpoint(converted("llama"), tiny_tokenizer(), tmp_path / "lin", card={})
    args = ["generate", str(tmp_path / "lin"), "--prompt", "the quick brown fox the quick brown", "--max-new-tokens", "16", "--no-chat"]
    free = CliRunner().invoke(app, args)
    text = free.stdout.rstrip("\n")
    assert free.exit_code == 0 and len(text) > 6, free.output
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    plain = CliRunner().invoke(app, [*args, "--stop", stop])
    spec = CliRunner().invoke(app, [*args, "--stop", stop, "--spec-decode", "--draft-tokens", "4"])
    assert spec.exit_code == 0 and plain.exit_code == 0, spec.output
    assert spec.stdout == plain.stdout == text[: text.index(stop)] + "\n"
    assert "stopped: stop_string" in spec.stderr and "stopped: stop_string" in plain.stderr and "tokens per step" in spec.stderr


@torch.inference_mode()
def test_speculative_decoding_streams_through_the_engine():
    model, tok = converted("llama"), tiny_tokenizer()
    ids = tok("the quick brown fox the quick brown")["input_ids"]
    pieces = []
    spec = speculative_generate(
        model, ids, PromptLookup(num_tokens=4), max_new_tokens=12, tokenizer=tok, on_token=lambda r, t, s: pieces.append(s)
    )
    plain = generate(model, ids, max_new_tokens=12, tokenizer=tok, stop_token_ids=())
    assert spec.tokens == plain.tokens[0] and spec.generation.texts == plain.texts
    assert "".join(pieces) == plain.texts[0] and len(pieces) == 12 and spec.finish_reason == "max_new_tokens"


def test_speculative_sampling_keeps_the_target_distribution():
    """Children tried in turn with residual renormalisation: the first emitted token after the root
    is distributed exactly as the target's p, whatever the guesses."""
    from linconv.generate import Sampler
    from linconv.speculative.verify import accept_sampled

    g = torch.Generator().manual_seed(0)
    tree = CandidateTree.from_paths(0, [[2], [5, 1], [0]])  # root's children: tokens 2, 5, 0
    logits = torch.randn(len(tree), 6, generator=g)
    sampler = Sampler(temperature=1.0, seed=1)
    counts = torch.zeros(6)
    for _ in range(20000):
        path, nxt = accept_sampled(tree, logits, sampler)
        counts[tree.tokens[path[1]] if len(path) > 1 else nxt] += 1
    torch.testing.assert_close(counts / counts.sum(), logits[0].softmax(-1), atol=0.012, rtol=0)


def test_speculative_sampling_is_seeded_and_runs_with_drafts():
    from linconv.generate import Sampler

    model = converted("llama", group_size=4)
    runs = [
        speculative_generate(model, PROMPT, PromptLookup(num_tokens=4), max_new_tokens=12, sampler=Sampler(0.8, seed=3)).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 12
