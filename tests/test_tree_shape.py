"""Tree shape from measurement: exact expected tokens, the search, and the measurements behind it."""

import pytest
import torch
from conftest import converted

from linconv.errors import LinconvError
from linconv.speculative.eagle import EagleDraft, EagleHead, save_eagle
from linconv.speculative.files import store_tree, stored_widths
from linconv.speculative.shape import (
    TreeCost,
    _width_sequences,
    accepted_depths,
    best_tree,
    continue_greedily,
    evaluate_tree,
    measure_cost,
    measure_ranks,
    shape_tree,
    tree_nodes,
)


def test_expected_tokens_count_consecutive_accepted_depths():
    ranks = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 5, 0], [3, 0, 0]])
    assert accepted_depths(ranks, [2, 1]).tolist() == [2, 2, 1, 0]
    assert accepted_depths(ranks, [4, 1, 2]).tolist() == [3, 3, 1, 3]
    shape = evaluate_tree(ranks, TreeCost({1: 1.0, 64: 1.0}), [2, 1])
    assert shape.expected_tokens == pytest.approx(1 + 5 / 4) and shape.nodes == 1 + 2 + 2
    assert shape.acceptance == pytest.approx([3 / 4, 2 / 3]) and shape.top1 == pytest.approx([0.5, 0.75, 0.75])
    assert tree_nodes([4, 2, 2]) == 1 + 4 + 8 + 16 and tree_nodes([]) == 1


def test_verify_cost_is_interpolated_and_extrapolated():
    cost = TreeCost({1: 1.0, 8: 1.0, 16: 2.0}, draft_s=(0.1, 0.2, 0.01))
    assert cost.verify(1) == 1.0 and cost.verify(12) == pytest.approx(1.5) and cost.verify(24) == pytest.approx(3.0)
    assert cost.step([]) == 1.0
    assert cost.step([2, 1]) == pytest.approx(1.0 + 0.1 + 0.2 * 2 + 0.01 * 4)


def _synthetic_ranks(per_depth, positions=4000, seed=0):
    """Ranks drawn independently per depth from the distributions ``per_depth`` (rank 0, 1, …; the
    remaining mass is rank 100: never inside a tree)."""
    g = torch.Generator().manual_seed(seed)
    columns = []
    for probs in per_depth:
        p = torch.tensor([*probs, 1 - sum(probs)])
        r = torch.multinomial(p, positions, replacement=True, generator=g)
        columns.append(torch.where(r == len(probs), 100, r))
    return torch.stack(columns, 1)


def test_search_finds_the_fastest_tree_under_the_measured_costs():
    ranks = _synthetic_ranks([[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.5, 0.2], [0.4, 0.1], [0.3]])
    flat_to_16 = TreeCost({1: 1.0, 16: 1.0, 32: 4.0, 64: 8.0})
    best = best_tree(ranks, flat_to_16)
    assert best.nodes <= 16  # larger trees cost 4x here
    candidates = list(_width_sequences(5, 8, 64))
    rates = {w: evaluate_tree(ranks, flat_to_16, w).tokens_per_s for w in candidates}
    assert best.tokens_per_s == pytest.approx(max(rates.values())) and tuple(best.widths) in rates
    # verification that costs one unit per node: speculating is never worth more than a chain
    per_node = TreeCost({1: 1.0, 64: 64.0})
    assert best_tree(ranks, per_node).widths == [1]
    # free verification, expensive draft depths: a wide, shallow tree
    deep_draft = TreeCost({1: 1.0, 64: 1.0}, draft_s=(0.0, 1.0, 0.0))
    assert len(best_tree(ranks, deep_draft).widths) <= 2 < len(best_tree(ranks, TreeCost({1: 1.0, 64: 1.0})).widths)


def test_search_respects_the_node_budget_and_refuses_empty_ranks():
    ranks = _synthetic_ranks([[0.9, 0.05], [0.9, 0.05], [0.9]])
    assert best_tree(ranks, TreeCost({1: 1.0, 64: 1.0}), max_nodes=8).nodes <= 8
    assert all(tree_nodes(w) <= 20 and list(w) == sorted(w, reverse=True) for w in _width_sequences(4, 5, 20))
    with pytest.raises(LinconvError, match="ranks"):
        best_tree(torch.zeros(0, 3, dtype=torch.long), TreeCost({1: 1.0}))


class PathDraft:
    """Guesses the true path (one-hot logits on it), or always the token after it when ``wrong``."""

    def __init__(self, wrong=False):
        self.wrong, self.widths = wrong, [1]

    def path_logits(self, context, hidden, path):
        logits = torch.zeros(len(path), 96)
        logits[torch.arange(len(path)), (torch.tensor(path) + int(self.wrong)) % 96] = 1.0
        return logits

    def propose(self, context, hidden=None):
        return [[1] * len(self.widths)]


@torch.inference_mode()
def test_measured_ranks_follow_the_targets_own_continuation():
    model = converted("llama", group_size=4)
    sequences = continue_greedily(model, torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), 12, batch=1)
    assert sequences.shape == (2, 16)
    assert measure_ranks(model, PathDraft(), sequences, 4, 3).eq(0).all()
    wrong = measure_ranks(model, PathDraft(wrong=True), sequences, 4, 3)
    assert wrong.shape == (2 * (12 - 3), 3) and wrong.eq(1).all()
    with pytest.raises(LinconvError, match="no ranked candidates"):
        measure_ranks(model, object(), sequences, 4, 3)


def test_shape_tree_measures_an_eagle_draft_and_the_tree_is_stored_with_it(tmp_path):
    model = converted("llama", group_size=4)
    draft = EagleDraft(EagleHead.for_model(model), [2, 2])
    shape = shape_tree(model, draft, torch.tensor([[5, 6, 7, 8, 9, 10]]), new_tokens=16, depth=3)
    assert 1 <= len(shape.widths) <= 3 and shape.positions == 16 - 3 and shape.step_s > 0
    assert set(shape.cost["verify_s"]) == {1, 2, 4, 8, 16, 32, 64} and draft.widths == [2, 2]
    assert draft.cache.get_seq_length() == 0  # reset after measuring
    cost = measure_cost(model, draft, [5, 6, 7, 8], max_depth=2, repeats=1)
    assert all(t > 0 for t in cost.verify_s.values()) and all(c >= 0 for c in cost.draft_s)
    save_eagle(draft.head, tmp_path)
    assert stored_widths(tmp_path, "eagle.json") is None and stored_widths(None, "eagle.json") is None
    store_tree(tmp_path, "eagle.json", shape.to_dict())
    assert stored_widths(tmp_path, "eagle.json") == shape.widths


def test_medusa_heads_are_shaped_the_same_way():
    from linconv.speculative.drafts import MedusaDraft
    from linconv.speculative.medusa import MedusaHeads

    model = converted("llama", group_size=4)
    draft = MedusaDraft(MedusaHeads.for_model(model, 3), [1, 1, 1])
    shape = shape_tree(model, draft, torch.tensor([[5, 6, 7, 8]]), new_tokens=12, depth=3)
    assert 1 <= len(shape.widths) <= 3 and shape.positions == 12 - 3 and draft.widths == [1, 1, 1]
