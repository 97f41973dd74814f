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


@pytest.mark.parametrize(
    "variant,options", [(v, {"group_size": 4}) for v in CAUSAL] + [(None, {"group_size": 16, "sinks": 3}), (None, {"sinks": 0})]
)
def test_speculative_output_is_greedy_output_for_every_variant(variant, options):
    model = converted("llama", variant, conv_kernel=5, **options)  # groups of 16: trees cross into the second group, sinks unheld
    truth = greedy(model, 24)
    ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False)[0, len(PROMPT) :].tolist()
    assert truth == ref
    for draft in (OracleDraft(truth), PromptLookup(num_tokens=4), DraftModel(converted("llama", "relu"), 3)):
        result = speculative_generate(model, PROMPT, draft, max_new_tokens=24)
        assert result.tokens == truth
    assert sum(speculative_generate(model, PROMPT, OracleDraft(truth), max_new_tokens=24).accepted) > 10


def test_a_plain_transformers_draft_gives_greedy_output():
    """A draft that linconv never converted decodes from a transformers DynamicCache, rolled back
    after each guess: drafting for its own twin it is always right, and the output stays greedy."""
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(tiny_config("llama", eos_token_id=None)).eval()
    twin = DraftModel(AutoModelForCausalLM.from_config(target.config).eval().requires_grad_(False), 3)
    twin.model.load_state_dict(target.state_dict())
    result = speculative_generate(target, PROMPT, twin, max_new_tokens=20)
    assert result.tokens == greedy(target, 20) and result.acceptance_rate == 1.0
    assert twin.cache.get_seq_length() == twin.seen == len(PROMPT) + 20 - 4  # the last step's guesses rolled back
    model = converted("llama", group_size=4, conv_kernel=5)
    other = DraftModel(AutoModelForCausalLM.from_config(tiny_config("llama", eos_token_id=None)).eval(), 3)
    assert speculative_generate(model, PROMPT, other, max_new_tokens=20).tokens == greedy(model, 20)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_softmax_and_hybrid_models_verify_trees_too(arch):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(arch, eos_token_id=None)).eval()
    hybrid = converted(arch, keep_softmax_layers=[1], group_size=4)
    for model in (base, hybrid):
        truth = greedy(model, 16)
        assert truth == model.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, len(PROMPT) :].tolist()
        assert speculative_generate(model, PROMPT, OracleDraft(truth), max_new_tokens=16).tokens == truth


@pytest.mark.parametrize("options", [{"group_size": 4}, {"group_size": 16, "sinks": 3}])
@torch.inference_mode()
def test_state_after_speculation_equals_state_after_plain_decoding(options):
    from linconv.speculative import verify as V

    model = converted("llama", conv_kernel=5, **options)
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


class FixedDraft:
    """Proposes the next ``depth`` tokens of ``truth`` (right) or tokens that never follow (wrong)."""

    def __init__(self, prompt, truth, depth, right):
        self.prompt, self.truth, self.depth, self.right = len(prompt), truth, depth, right

    def propose(self, context, hidden=None):
        done = len(context) - self.prompt  # generated tokens so far, the root included
        guess = self.truth[done : done + self.depth]
        return [guess if self.right else [(t + 1) % 90 for t in guess]]


def test_spec_bench_point_reports_identical_output_and_acceptance():
    from linconv.bench.speculative import spec_decode_point, spec_prompts

    model = converted("llama", group_size=4)
    prompt = spec_prompts(list(range(4, 60)) * 4, length=40)["grounded"]
    truth = speculative_generate(model, prompt, None, max_new_tokens=12).tokens
    right = spec_decode_point(model, "linearized", "grounded", prompt, FixedDraft(prompt, truth, 3, True), new_tokens=11)
    # 11 tokens: the first from the prefill, 2 steps of 3 accepted guesses + the next token, then the budget cuts the guesses to 1
    assert right.identical and right.acceptance_rate == 1.0 and right.histogram == {1: 1, 3: 2} and right.mean_tokens_per_step == 10 / 3
    wrong = spec_decode_point(model, "linearized", "grounded", prompt, FixedDraft(prompt, truth, 3, False), new_tokens=12)
    assert wrong.identical and wrong.acceptance_rate == 0.0 and wrong.histogram == {0: 11} and wrong.mean_tokens_per_step == 1
    assert wrong.to_dict()["speedup"] == wrong.spec_tokens_per_s / wrong.plain_tokens_per_s


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
    assert len(plain.stdout.strip()) > 6 and spec.stdout == plain.stdout  # greedy: the same text, whatever the draft
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


def radical_inverse(i: int, base: int) -> float:
    """The i-th point of the van der Corput sequence in ``base`` (one dimension of a Halton sequence)."""
    f, r = 1.0, 0.0
    while i:
        f /= base
        r += f * (i % base)
        i //= base
    return r


class EquidistributedSampler:
    """Stands in for Sampler's random draws with a Halton sequence: draw k of sample i is point i of
    dimension k. Frequencies then converge like 1/n instead of 1/√n, so a few thousand samples pin
    the distribution to ~0.1% and a 1% bias fails the test."""

    temperature, bases = 1.0, (2, 3, 5, 7, 11, 13)

    def start(self, i: int) -> None:
        self.index, self.dim = i + 1, 0

    def _next(self) -> float:
        self.dim += 1
        return radical_inverse(self.index, self.bases[self.dim - 1])

    def probs(self, logits):
        return logits.float().softmax(-1)

    def uniform(self, device) -> float:
        return self._next()

    def draw(self, probs):
        return torch.searchsorted(probs.cumsum(-1), torch.tensor([[self._next()]])).clamp(max=probs.shape[-1] - 1)[:, 0]


def test_speculative_sampling_keeps_the_target_distribution():
    """Children tried in turn with residual renormalisation: the first emitted token after the root
    is distributed exactly as the target's p, whatever the guesses."""
    from linconv.speculative.verify import accept_sampled

    g = torch.Generator().manual_seed(0)
    tree = CandidateTree.from_paths(0, [[2], [5, 1], [0]])  # root's children: tokens 2, 5, 0
    logits = torch.randn(len(tree), 6, generator=g)
    sampler = EquidistributedSampler()
    counts = torch.zeros(6)
    n = 4000
    for i in range(n):
        sampler.start(i)
        path, nxt = accept_sampled(tree, logits, sampler)
        counts[tree.tokens[path[1]] if len(path) > 1 else nxt] += 1
    torch.testing.assert_close(counts / n, logits[0].softmax(-1), atol=0.004, rtol=0)


def test_speculative_sampling_is_seeded_and_runs_with_drafts():
    from linconv.generate import Sampler

    model = converted("llama", group_size=4)
    runs = [
        speculative_generate(model, PROMPT, PromptLookup(num_tokens=4), max_new_tokens=12, sampler=Sampler(0.8, seed=3)).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 12
