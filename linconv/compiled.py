"""The one-token decode step, eager or compiled with ``torch.compile`` (gpt-fast's recipe).

One function, :func:`decode_step`, runs a model on the newest token of every row and returns the
logits; the engine calls it once per plain decoding step, for a linconv model (static-shape state
written in place) and for a softmax model (its KV cache) alike, so a comparison stays fair.
``torch.compile`` turns the dozens of small per-layer ops of that step into a few fused kernels
(C++ from inductor on a CPU, Triton and CUDA graphs on a GPU): it needs a compiler, and compiling
takes minutes on a CPU (``compile_plan`` says when it is used).
"""

from __future__ import annotations

import importlib.util
import shutil

import torch
from torch import Tensor


def decode_step(model, tokens: Tensor, positions: Tensor, cache, mask: Tensor | None = None) -> Tensor:
    """Logits [B, V] of the next token after ``tokens`` [B, 1] at ``positions`` [B, 1], continuing
    ``cache`` (``mask`` [B, past + 1]: the attention mask of a left-padded softmax batch)."""
    extra = {} if mask is None else {"attention_mask": mask}
    return model(tokens, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1, **extra).logits[:, -1]


_compiled = None


def compiled_decode_step():
    """:func:`decode_step` through ``torch.compile`` (one wrapper per process: its graphs are reused
    by every model of the same architecture). Shapes are dynamic from the start so that a KV cache
    that grows, or a group buffer filling up, does not trigger a recompilation per token."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(decode_step, dynamic=True)
    return _compiled


def missing_compiler(device: torch.device | str) -> str | None:
    """What ``torch.compile`` lacks on ``device`` (a C++ compiler on a CPU; Triton and a C compiler
    on CUDA), or None when it can compile."""
    if torch.device(device).type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        return None if shutil.which("cc") or shutil.which("gcc") else "no C compiler (cc, gcc) found"
    return None if any(shutil.which(c) for c in ("g++", "c++", "clang++")) else "no C++ compiler (g++, c++, clang++) found"


def compile_plan(device: torch.device | str, requested: bool | None) -> tuple[bool, str | None]:
    """Whether to compile the decode step, and a one-line note when a request cannot be honoured.

    ``requested`` None takes the default, eager: measured on the default model (fp32, one thread
    of a busy 2-core CPU, 300-token context), the compiled step is 1.35x faster than the eager one
    for the linearized model and 1.26x for the original, but compiling took 7 and 2 minutes: more
    than a generation of a few hundred tokens gains. ``--compile`` pays in long runs (benchmarks).
    On a GPU (CUDA graphs) the gain should be larger; not measured yet.
    """
    if not requested:
        return False, None
    missing = missing_compiler(device)
    if missing is not None:
        return False, f"--compile: {missing}; decoding eagerly"
    return True, None
