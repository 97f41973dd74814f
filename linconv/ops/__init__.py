"""Pure tensor ops with explicit state in and out: no nn.Module, no transformers, no printing.

Layout everywhere: [B, H, T, D] (keys/values of grouped-query models may have fewer heads where an
op says so). States are fp32 NamedTuples of a fixed size; ``None`` means "before any token". The
sequence forms return new states; the decoding steps (T = 1) update the given state in place.
"""

from linconv.ops.conv import advance_conv, causal_dwconv, empty_conv_tail, unmasked_dwconv
from linconv.ops.linear import LinearState, advance_linear, empty_linear_state, linear_attention, linear_attention_step, repeat_heads
from linconv.ops.local import SCORES, GroupState, advance_group, empty_group_state, grouped_attention
from linconv.ops.tree import ancestor_mask, conv_tree, grouped_tree, linear_tree, tree_depths, unfold_conv_kernel

__all__ = [
    "SCORES",
    "GroupState",
    "LinearState",
    "advance_conv",
    "advance_group",
    "advance_linear",
    "ancestor_mask",
    "causal_dwconv",
    "conv_tree",
    "empty_conv_tail",
    "empty_group_state",
    "empty_linear_state",
    "grouped_attention",
    "grouped_tree",
    "linear_attention",
    "linear_attention_step",
    "linear_tree",
    "repeat_heads",
    "tree_depths",
    "unfold_conv_kernel",
    "unmasked_dwconv",
]
