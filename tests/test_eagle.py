"""EAGLE draft head: exact greedy speculation, a state that only holds committed tokens, training, files."""

import pytest
import torch
from conftest import converted, tiny_tokenizer
from test_model import CAUSAL

from linconv.errors import LinconvError
from linconv.speculative.decode import speculative_generate
from linconv.speculative.drafts import MedusaDraft, make_draft
from linconv.speculative.eagle import EAGLE_CONFIG, EagleDraft, EagleHead, has_eagle, load_eagle, save_eagle
from linconv.speculative.eagle_train import EagleTrainConfig, eagle_setup, train_eagle
from linconv.speculative.medusa import MedusaHeads
from linconv.speculative.shape import spread_windows

PROMPT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9] * 3  # 36 tokens: advance folds the prompt eagerly


def jittered(module, scale=0.05, seed=0):
    """Move a fresh head away from its init so that its guesses differ between tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def plain(model, n, prompt=PROMPT):
    return speculative_generate(model, prompt, None, max_new_tokens=n).tokens


@pytest.mark.parametrize("variant", [*CAUSAL, "hybrid"])
def test_greedy_eagle_and_medusa_speculation_is_plain_greedy(variant):
    options = {"keep_softmax_layers": [1]} if variant == "hybrid" else {}
    model = converted("llama", "augmented" if variant == "hybrid" else variant, group_size=4, conv_kernel=5, **options)
    truth = plain(model, 20)
    eagle = EagleDraft(jittered(EagleHead.for_model(model)), [6, 3, 2])
    medusa = MedusaDraft(jittered(MedusaHeads.for_model(model, 3)), [4, 2, 2])
    for draft in (eagle, medusa):
        result = speculative_generate(model, PROMPT, draft, max_new_tokens=20)
        assert result.tokens == truth and max(result.offered) == 3


def _head_state_after(model, head, sequence, pairs):
    """A fresh head's state after folding the first ``pairs`` pairs (f_i, x_{i+1}) of ``sequence``
    in one forward, with the target's features from one forward over the sequence."""
    features = model.base_model(input_ids=torch.tensor([sequence])).last_hidden_state
    draft = EagleDraft(head)
    head(features[:, :pairs], torch.tensor([sequence[1 : pairs + 1]]), cache=draft.cache)
    return draft.cache


def _assert_same_state(a, b):
    assert a.lengths == b.lengths
    for x, y in zip(a.states[0].tensors(), b.states[0].tensors(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("variant", ["augmented", "augmented-softmax", "hedgehog"])
def test_draft_state_after_speculation_holds_only_the_committed_tokens(variant):
    """Steps that commit 1..4 tokens each, a wide tree proposed before every one: the head's state
    equals a fresh head's after folding the committed pairs in one forward."""
    model = converted("llama", variant, group_size=4, conv_kernel=5)
    head = jittered(EagleHead.for_model(model))
    sequence = PROMPT + plain(model, 14)
    features = model.base_model(input_ids=torch.tensor([sequence])).last_hidden_state[0]
    draft = EagleDraft(head, [4, 3, 2])
    draft.advance(PROMPT, features[: len(PROMPT)])
    done = len(PROMPT)
    for k in (1, 3, 2, 4, 1, 2):
        draft.propose(sequence[: done + 1], features[done - 1])  # the root is sequence[done]
        draft.advance(sequence[done : done + k], features[done : done + k])  # root + k - 1 accepted
        done += k
    draft.propose(sequence[: done + 1], features[done - 1])
    assert draft.cache.get_seq_length() == done
    _assert_same_state(draft.cache, _head_state_after(model, head, sequence, done))
    result = speculative_generate(model, PROMPT, EagleDraft(head, [4, 3, 2]), max_new_tokens=12)
    assert result.tokens == sequence[len(PROMPT) : len(PROMPT) + 12]


@torch.inference_mode()
def test_drafting_a_tree_leaves_the_state_of_plain_drafting():
    """Proposing a wide tree (all but one branch rejected later) changes the head's state exactly as
    folding the committed pairs alone does."""
    model = converted("llama", group_size=4, conv_kernel=5)
    head = jittered(EagleHead.for_model(model))
    features = model.base_model(input_ids=torch.tensor([PROMPT])).last_hidden_state[0]
    tree, chain = EagleDraft(head, [5, 4, 3]), EagleDraft(head, [1])
    for draft in (tree, chain):
        draft.advance(PROMPT, features)
    paths = tree.propose([*PROMPT, 13], features[-1])
    chain.path_logits([*PROMPT, 13], features[-1], [0])  # folds, drafts one level, no tree
    assert len(paths) == 5 * 4 * 3
    _assert_same_state(tree.cache, chain.cache)
    assert tree.cache.tree is None  # the tree ended (rolled back) after drafting


def test_eagle_head_trains_on_its_targets_continuations_and_then_drafts_accepted_tokens(tmp_path):
    model = converted("llama", group_size=4, conv_kernel=5)
    tokenizer = tiny_tokenizer()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog hello world 0 1 2 3"] * 100))
    cfg = EagleTrainConfig(text=str(text), prompts=16, prompt_tokens=8, new_tokens=24, steps=120, batch_size=4, lr=3e-3)
    result = train_eagle(model, tokenizer, cfg)
    assert result.losses[-1] < 0.7 * result.losses[0] and result.accuracy > 0.4
    assert result.tokens == 16 * 32 and result.params > 0
    prompt = tokenizer("the quick brown fox jumps over", add_special_tokens=False)["input_ids"]
    spec = speculative_generate(model, prompt, EagleDraft(result.head, [2, 2, 1]), max_new_tokens=24)
    assert spec.tokens == plain(model, 24, prompt) and sum(spec.accepted) >= 3


def test_eagle_text_windows_add_the_targets_view_of_the_text_as_it_is(tmp_path):
    model = converted("llama", group_size=4, conv_kernel=5)
    tokenizer = tiny_tokenizer()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11}" for i in range(600)))
    cfg = EagleTrainConfig(text=str(text), prompts=4, prompt_tokens=8, new_tokens=8, text_windows=6, candidates=4, draft_vocab=0)
    _, data = eagle_setup(model, tokenizer, cfg)
    assert data.ids.shape == (10, 16) and data.features.shape[:2] == (10, 16)
    read = spread_windows(tokenizer, str(text), "train", 6, 16)
    assert torch.equal(data.ids[4:], read)  # the windows themselves, not the model's continuations
    with torch.no_grad():
        out = model(read, output_hidden_states=True)
    torch.testing.assert_close(data.features[4:], out.hidden_states[-1])
    assert torch.equal(data.candidates[4:, :, 0], out.logits.argmax(-1))  # the target's own next-token choice first
    with pytest.raises(LinconvError, match="text-windows must be >= 0"):
        EagleTrainConfig(text_windows=-1).validate()


def test_eagle_head_is_saved_beside_the_checkpoint_and_loaded_by_draft_eagle(tmp_path):
    model = converted("qwen2", keep_softmax_layers=[1], group_size=4)
    head = jittered(EagleHead.for_model(model))
    with pytest.raises(LinconvError, match="no EAGLE head"):
        make_draft("eagle", model, None, str(tmp_path))
    assert not has_eagle(tmp_path)
    save_eagle(head, tmp_path, extra={"tree": {"widths": [3, 1]}})
    assert has_eagle(tmp_path) and (tmp_path / "eagle.safetensors").is_file()
    loaded = load_eagle(tmp_path, model)
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not any("embed" in n or "lm_head" in n for n in loaded.state_dict())  # the target's, not saved
    assert make_draft("eagle", model, None, str(tmp_path)).widths == [3, 1]  # the stored tree
    assert make_draft("eagle", model, None, str(tmp_path), tree_widths=[2, 2]).widths == [2, 2]
    truth = plain(model, 12)
    assert speculative_generate(model, PROMPT, make_draft("eagle", model, None, str(tmp_path)), max_new_tokens=12).tokens == truth
    (tmp_path / EAGLE_CONFIG).write_text('{"format_version": 99}')
    with pytest.raises(LinconvError, match="newer than this linconv"):
        load_eagle(tmp_path, model)


def test_eagle_head_is_one_linear_block_of_the_targets_family():
    from linconv.attention.module import LinconvAttention

    for arch in ("llama", "gpt2"):
        model = converted(arch, keep_softmax_layers=[0], group_size=4)
        head = EagleHead.for_model(model)
        attns = [m for m in head.modules() if isinstance(m, LinconvAttention)]
        assert len(attns) == 1 and attns[0].spec.variant == model.linconv_config.attention
        assert head.decoder.config.num_hidden_layers == 1 and type(head.decoder) is type(model.base_model)
    with pytest.raises(LinconvError, match="positive"):
        EagleDraft(head, [2, 0])
    with pytest.raises(LinconvError, match="vocabulary"):
        EagleDraft(head, [head.output_head.weight.shape[0] + 1])
    with pytest.raises(LinconvError, match="nodes"):
        EagleDraft(head, [64, 64, 64])
    with pytest.raises(LinconvError, match="advance"):
        EagleDraft(head).propose([1, 2], torch.zeros(32))


def _draft(kind, model):
    from linconv.speculative.drafts import DraftModel, PromptLookup

    torch.manual_seed(0)  # the same draft every time: the sampled tokens depend on its guesses
    return {
        "lookup": lambda: PromptLookup(num_tokens=4, max_candidates=3),
        "medusa": lambda: MedusaDraft(jittered(MedusaHeads.for_model(model, 2)), [3, 2]),
        "eagle": lambda: EagleDraft(jittered(EagleHead.for_model(model)), [3, 2, 2]),
        "model": lambda: DraftModel(converted("llama", "relu"), 3),
    }[kind]()


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["lookup", "medusa", "eagle", "model"])
def test_speculative_sampling_keeps_the_target_distribution_with_every_draft(kind):
    """On each draft's own tree (target logits boosted on the guesses so that they carry mass), the
    token after the root follows the target's p, and so does the token after the likeliest child."""
    from linconv.attention.state import new_cache
    from linconv.generate import Sampler
    from linconv.speculative.tree import CandidateTree
    from linconv.speculative.verify import accept_sampled, verify

    model = converted("llama", group_size=4, conv_kernel=5)
    draft = _draft(kind, model)
    cache = new_cache(model)
    features = model.base_model(input_ids=torch.tensor([PROMPT]), cache=cache, use_cache=True).last_hidden_state[0]
    if hasattr(draft, "advance"):
        draft.advance(PROMPT, features)
    tree = CandidateTree.from_paths(PROMPT[0], draft.propose([*PROMPT, PROMPT[0]], features[-1]))
    logits = verify(model, cache, tree, len(PROMPT))[1]
    for node, parent in enumerate(tree.parents):
        if parent >= 0:
            logits[parent, tree.tokens[node]] += 4.0
    sampler = Sampler(temperature=1.0, seed=0)
    child = max(tree.children(0).values(), key=lambda c: float(logits[0, tree.tokens[c]]))
    first, second = [], []
    for _ in range(6000):
        path, nxt = accept_sampled(tree, logits, sampler)
        first.append(tree.tokens[path[1]] if len(path) > 1 else nxt)
        if len(path) > 1 and path[1] == child:
            second.append(tree.tokens[path[2]] if len(path) > 2 else nxt)
    p = logits.softmax(-1)
    assert p[0, list(tree.children(0))].sum() > 0.2 and max(tree.depths) >= 3  # the guesses matter
    for node, emitted in ((0, first), (child, second)):  # frequencies of the guessed tokens vs p
        guessed = list(tree.children(node))
        freq = torch.tensor([emitted.count(t) / len(emitted) for t in guessed])
        torch.testing.assert_close(freq, p[node, guessed], atol=4 / len(emitted) ** 0.5, rtol=0)
    runs = [
        speculative_generate(model, PROMPT, _draft(kind, model), max_new_tokens=10, sampler=Sampler(0.8, seed=3)).tokens for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 10


def test_draft_vocabulary_limits_the_guesses_and_is_saved(tmp_path):
    from linconv.speculative.eagle_train import frequent_tokens

    assert frequent_tokens(torch.tensor([[7, 7, 3, 9], [9, 7, 1, 1]]), 12, 3).tolist() == [1, 7, 9]
    assert frequent_tokens(torch.tensor([5, 5]), 12, 3).tolist() == [0, 1, 5]  # unseen: lowest ids first
    assert frequent_tokens(torch.tensor([5]), 12, 12) is None and frequent_tokens(torch.tensor([5]), 12, 0) is None
    model = converted("llama", group_size=4, conv_kernel=5)
    vocab = torch.arange(0, 96, 3)
    head = jittered(EagleHead.for_model(model)).set_vocab(vocab)
    guess = torch.randn(2, 32)
    logits = head.logits(guess)
    torch.testing.assert_close(logits[:, vocab], model.get_output_embeddings()(guess)[:, vocab])
    assert torch.isinf(logits[:, 1]).all()
    draft = EagleDraft(head, [4, 2])
    features = model.base_model(input_ids=torch.tensor([PROMPT])).last_hidden_state[0]
    draft.advance(PROMPT, features)
    assert {t for path in draft.propose([*PROMPT, 3], features[-1]) for t in path} <= set(vocab.tolist())
    assert speculative_generate(model, PROMPT, EagleDraft(head, [4, 2]), max_new_tokens=12).tokens == plain(model, 12)
    save_eagle(head, tmp_path)
    assert torch.equal(load_eagle(tmp_path, model).vocab, vocab)
    save_eagle(head.set_vocab(None), tmp_path)
    assert load_eagle(tmp_path, model).vocab is None
