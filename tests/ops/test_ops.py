"""Fast ops against the slow references: outputs, final states, gradients, trees, causality."""

import random

import pytest
import torch
import torch.nn.functional as F

from linconv import ops
from linconv.ops import reference as ref

B, H, D = 2, 3, 8
PHIS = {"none": None, "relu": F.relu, "elu": lambda x: F.elu(x) + 1}


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def qkv(T, seed=0, unit=False, kv_heads=H):
    """q [B, H, T, D]; k, v [B, kv_heads, T, D] (fewer heads: grouped-query attention)."""
    q, k, v = rand(B, H, T, D, seed=seed), rand(B, kv_heads, T, D, seed=seed + 1), rand(B, kv_heads, T, D, seed=seed + 2)
    if unit:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return q, k, v


def cloned(state):
    """A copy of a state, for the steps that update theirs in place."""
    return type(state)(*(x.clone() if isinstance(x, torch.Tensor) else x for x in state))


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def grads_close(got, want, tol=1e-4):
    """Gradients agree to ``tol`` relative to their largest entry (fp32 sums of large terms)."""
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol * w.abs().max().item(), rtol=0)


def states_close(a, b, tol=1e-4):
    if isinstance(a, ops.GroupState):  # the buffers hold the current group in their first `fill` slots
        assert a.fill == b.fill and a.k_buf.shape == b.k_buf.shape
        assert a.held == b.held and a.sinks == b.sinks
        a, b = (
            (a.S, a.z, a.keys(), a.values(), a.sink_keys(), a.sink_values()),
            (b.S, b.z, b.keys(), b.values(), b.sink_keys(), b.sink_values()),
        )
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            close(x, y, tol)


# ---- kernelized linear attention ---------------------------------------------------------------


def linear_state(normalize, seed=9):
    S = rand(B, H, D, D, seed=seed).abs()
    return ops.LinearState(S, rand(B, H, D, seed=seed + 1).abs() + 1 if normalize else None)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("T", [1, 7, 16, 37])
def test_linear_chunked_and_step_equal_reference(normalize, T):
    q, k, v = *(F.elu(x) + 1 for x in qkv(T)[:2]), qkv(T)[2]
    s0 = linear_state(normalize)
    out, state = ops.linear_attention(q, k, v, s0, normalize=normalize, chunk_size=8)
    want = ref.linear_quadratic(q, k, v, s0, normalize)
    loop_out, loop_state = ref.linear_loop(q, k, v, s0, normalize)
    close(out, want)
    close(loop_out, want)
    states_close(state, loop_state)
    st = cloned(s0)
    for t in range(T):
        o, st = ops.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st)
        close(o, want[:, :, t])
    states_close(st, loop_state)
    states_close(ops.advance_linear(s0, k, v), loop_state)


def test_linear_gradients_match_reference():
    q, k, v = (x.requires_grad_() for x in qkv(21))
    s0 = linear_state(True)
    out, _ = ops.linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, s0, chunk_size=4)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = ref.linear_quadratic(F.elu(q) + 1, F.elu(k) + 1, v, s0, True)
    grads_close(grads, torch.autograd.grad(want.square().sum(), (q, k, v)))


# ---- grouped attention -------------------------------------------------------------------------


def grouped_kwargs(score, phi_name, G=8):
    return dict(group_size=G, score=score, phi=PHIS[phi_name], alpha=0.7)


@pytest.mark.parametrize("score", ops.SCORES)
@pytest.mark.parametrize("phi_name", list(PHIS))
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("T,prefix,kv_heads", [(1, 0, 3), (13, 0, 3), (16, 3, 1), (29, 11, 3), (5, 6, 1), (21, 7, 1), (2, 1, 1)])
def test_grouped_equals_loop_with_state(score, phi_name, sinks, T, prefix, kv_heads):
    kw = grouped_kwargs(score, phi_name)
    q, k, v = qkv(prefix + T, unit=score != "softmax", kv_heads=kv_heads)
    s0 = ops.empty_group_state(q, k, v, kw["phi"], 8, sinks)
    if prefix:
        _, s0 = ref.grouped_loop(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], s0, **kw)
    q2, k2, v2 = (x[:, :, prefix:] for x in (q, k, v))
    out, state = ops.grouped_attention(q2, k2, v2, s0, **kw)
    want, want_state = ref.grouped_loop(q2, k2, v2, s0, **kw)
    close(out, want)
    states_close(state, want_state)
    states_close(ops.advance_group(s0, k2, v2, 8, kw["phi"]), want_state)
    st = cloned(s0)  # the decoding step is the same op with T = 1, writing into its state in place
    tensors = [t.data_ptr() for t in st if isinstance(t, torch.Tensor)]
    for t in range(T):
        o, st = ops.grouped_attention(q2[:, :, t : t + 1], k2[:, :, t : t + 1], v2[:, :, t : t + 1], st, **kw)
        close(o[:, :, 0], want[:, :, t])
    states_close(st, want_state)
    assert [t.data_ptr() for t in st if isinstance(t, torch.Tensor)] == tensors  # no new state tensor per token


@pytest.mark.parametrize("score", ops.SCORES)
@pytest.mark.parametrize("kv_heads,sinks", [(3, 0), (1, 0), (1, 2)])
def test_grouped_gradients_match_reference(score, kv_heads, sinks):
    q, k, v = qkv(19, unit=True, kv_heads=kv_heads)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    alpha = torch.tensor(0.5, requires_grad=True)
    kw = dict(group_size=8, score=score, phi=PHIS["elu"], alpha=alpha)
    out, _ = ops.grouped_attention(q, k, v, sinks=sinks, **kw)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, alpha))
    want, _ = ref.grouped_loop(q, k, v, ops.empty_group_state(q, k, v, kw["phi"], 8, sinks), **kw)
    grads_close(grads, torch.autograd.grad(want.square().sum(), (q, k, v, alpha)))


# ---- depthwise convolution ---------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 4, 32])
@pytest.mark.parametrize("kv_heads", [3, 1])
def test_conv_equals_loop_and_streams(K, kv_heads):
    v = rand(B, kv_heads, 23, D)
    w = rand(H, K, seed=5)
    out, tail = ops.causal_dwconv(v, w)
    want, want_tail = ref.conv_loop(v, w, ops.empty_conv_tail(v, K))
    close(out, want)
    close(tail, want_tail)
    o1, t1 = ops.causal_dwconv(v[:, :, :10], w)
    o2, t2 = ops.causal_dwconv(v[:, :, 10:], w, t1)
    close(torch.cat([o1, o2], 2), want)
    close(t2, want_tail)
    close(ops.advance_conv(t1, v[:, :, 10:]), want_tail)
    st = t1.clone()  # the step shifts its tail in place
    for t in range(10, 23):
        o, st = ops.causal_dwconv(v[:, :, t : t + 1], w, st)
        close(o[:, :, 0], want[:, :, t])
    close(st, want_tail)


def test_conv_gradients_match_loop():
    v = rand(B, 1, 9, D).requires_grad_()  # one value head read by every query head's kernel
    w = rand(H, 4, seed=5).requires_grad_()
    tail = ops.empty_conv_tail(v, 4)
    g = torch.autograd.grad(ops.causal_dwconv(v, w, tail)[0].square().sum(), (v, w))
    grads_close(g, torch.autograd.grad(ref.conv_loop(v, w, tail)[0].square().sum(), (v, w)))


def test_unmasked_conv_reads_the_future_and_its_causal_half_is_the_masked_conv():
    v = rand(B, H, 11, D)
    w = rand(H, 7, seed=5)  # K = 4: taps 0..2 future, 3 current, 4..6 past
    want = torch.zeros_like(v)
    for t in range(11):
        for j in range(-3, 4):
            if 0 <= t - j < 11:
                want[:, :, t] += w[:, 3 + j].view(1, -1, 1) * v[:, :, t - j]
    close(ops.unmasked_dwconv(v, w), want)
    masked = torch.cat([torch.zeros(H, 3), w[:, 3:]], 1)
    close(ops.unmasked_dwconv(v, masked), ops.causal_dwconv(v, w[:, 3:])[0])


# ---- trees -------------------------------------------------------------------------------------


def random_tree(n, seed):
    rng = random.Random(seed)
    return [-1] + [rng.randrange(-1, i) if rng.random() < 0.2 else rng.randrange(0, i) for i in range(1, n)]


TREES = [[-1], [-1, 0, 1, 2, 3, 4, 5], [-1, -1, 0, 0, 1, 2, 2, 4], random_tree(12, 1), random_tree(15, 2)]


@pytest.mark.parametrize("parents", TREES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_tree_equals_path_replay(parents, normalize):
    N = len(parents)
    q, k, v = *(F.elu(x) + 1 for x in qkv(N)[:2]), qkv(N)[2]
    s0 = linear_state(normalize)
    out = ops.linear_tree(q, k, v, parents, s0)
    want = ref.replay_tree(parents, lambda p: ref.linear_loop(q[:, :, p], k[:, :, p], v[:, :, p], s0, normalize)[0])
    close(out, want)


@pytest.mark.parametrize("parents", TREES)
@pytest.mark.parametrize("score", ops.SCORES)
# 6 of G=8 buffered: deeper paths cross the boundary; first=0: the tree starts in the first group,
# whose first 2 tokens (sinks=2) are sinks that paths crossing into the second group must still see
@pytest.mark.parametrize(
    "first,prefix,kv_heads,sinks", [(8, 0, 3, 0), (8, 3, 1, 0), (8, 6, 3, 0), (8, 6, 3, 2), (0, 6, 1, 2), (0, 1, 3, 2)]
)
def test_grouped_tree_equals_path_replay(parents, score, first, prefix, kv_heads, sinks):
    kw = grouped_kwargs(score, "elu")
    N = len(parents)
    q, k, v = qkv(prefix + N + first, unit=score != "softmax", kv_heads=kv_heads)
    _, s0 = ops.grouped_attention(q[:, :, : first + prefix], k[:, :, : first + prefix], v[:, :, : first + prefix], sinks=sinks, **kw)
    qt, kt, vt = (x[:, :, first + prefix :] for x in (q, k, v))
    out = ops.grouped_tree(qt, kt, vt, parents, s0, **kw)
    want = ref.replay_tree(parents, lambda p: ref.grouped_loop(qt[:, :, p], kt[:, :, p], vt[:, :, p], s0, **kw)[0])
    close(out, want)


@pytest.mark.parametrize("parents", TREES)
@pytest.mark.parametrize("K,kv_heads", [(1, 3), (3, 1), (32, 3)])
def test_conv_tree_equals_path_replay(parents, K, kv_heads):
    N = len(parents)
    v, w = rand(B, kv_heads, N, D), rand(H, K, seed=4)
    _, tail = ops.causal_dwconv(rand(B, kv_heads, 5, D, seed=8), w)  # context shorter than the kernel
    out = ops.conv_tree(v, w, parents, tail)
    want = ref.replay_tree(parents, lambda p: ref.conv_loop(v[:, :, p], w, tail)[0])
    close(out, want)


def test_single_path_tree_is_plain_decoding():
    N, K = 10, 4
    v, w = rand(B, H, N, D), rand(H, K, seed=4)
    chain = list(range(-1, N - 1))
    tail = ops.empty_conv_tail(v, K)
    close(ops.conv_tree(v, w, chain, tail), ops.causal_dwconv(v, w, tail)[0])
    q, k, _ = qkv(N, unit=True)
    kw = grouped_kwargs("relu2", "relu", G=4)
    close(ops.grouped_tree(q, k, v, chain, ops.empty_group_state(q, k, v, F.relu, 4), **kw), ops.grouped_attention(q, k, v, **kw)[0])


def test_bad_tree_is_rejected():
    with pytest.raises(ValueError, match="parents must come before"):
        ops.tree_depths([-1, 2, 0])


# ---- causality and long sequences --------------------------------------------------------------


def perturbed_after(x, t):
    y = x.clone()
    y[:, :, t + 1 :] = torch.randn_like(y[:, :, t + 1 :])
    return y


@pytest.mark.parametrize("t", [0, 9, 30])
def test_ops_are_causal(t):
    q, k, v = qkv(40, unit=True)
    q2, k2, v2 = (perturbed_after(x, t) for x in (q, k, v))
    runs = [
        lambda a, b, c: ops.linear_attention(F.relu(a), F.relu(b), c, chunk_size=8)[0],
        lambda a, b, c: ops.grouped_attention(a, b, c, group_size=8, score="relu2", phi=F.relu)[0],
        lambda a, b, c: ops.grouped_attention(a, b, c, group_size=8, score="softmax", phi=F.relu, sinks=4)[0],
        lambda a, b, c: ops.causal_dwconv(c, rand(H, 6))[0],
    ]
    for run in runs:
        close(run(q, k, v)[:, :, : t + 1], run(q2, k2, v2)[:, :, : t + 1], tol=1e-6)


def test_long_bf16_inputs_stay_finite():
    T = 32768
    q, k, v = (rand(1, 2, T, 16, seed=i, dtype=torch.bfloat16) for i in range(3))
    out, st = ops.linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, chunk_size=128)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.isfinite(st.S).all()
    out, st = ops.grouped_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, group_size=64, score="relu2", phi=F.relu)
    assert torch.isfinite(out).all() and torch.isfinite(st.S).all() and st.S.dtype == torch.float32
    out, _ = ops.causal_dwconv(v, rand(2, 32))
    assert torch.isfinite(out).all()


def test_sinks_change_only_the_later_groups_and_never_join_the_global_sums():
    q, k, v = qkv(20)
    kw = dict(group_size=8, score="softmax", phi=F.relu)
    plain, plain_state = ops.grouped_attention(q, k, v, **kw)
    sunk, sunk_state = ops.grouped_attention(q, k, v, sinks=3, **kw)
    close(sunk[:, :, :8], plain[:, :, :8], tol=1e-6)
    assert (sunk[:, :, 8:] - plain[:, :, 8:]).abs().amax(-1).min() > 1e-5  # every later query reads them
    close(sunk_state.sink_keys(), k[:, :, :3])
    drop = F.relu(k[:, :, :3]).transpose(-1, -2) @ v[:, :, :3]  # the sinks' share of S without sinks
    close(sunk_state.S, plain_state.S - drop)
