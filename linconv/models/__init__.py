"""Architecture adapters, one registry: where a model keeps its attention and how to call it.

An adapter knows a family's decoder blocks, the attribute of the attention module in each block,
the projection modules the new attention reuses, and how to compute q, k, v (with RoPE where the
family uses it) and the output projection. Every family also gets a linconv model type
(``linconv-<family>``) so transformers can load converted checkpoints after ``import linconv``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from linconv.errors import LinconvError


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """[B, T, H*D] -> [B, H, T, D]."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """[B, H, T, D] -> [B, T, H*D]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _llama_qkv(m: nn.Module, h: Tensor, position_embeddings) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = (_heads(proj(h), m.head_dim) for proj in (m.q_proj, m.k_proj, m.v_proj))
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _gpt2_qkv(m: nn.Module, h: Tensor, position_embeddings) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = m.c_attn(h).split(m.num_heads * m.head_dim, dim=2)  # absolute positions: no rotation
    return _heads(q, m.head_dim), _heads(k, m.head_dim), _heads(v, m.head_dim)


def _llama_dims(config) -> tuple[int, int, int]:
    H = config.num_attention_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // H
    return H, config.num_key_value_heads or H, D


def _gpt2_dims(config) -> tuple[int, int, int]:
    H = config.n_head
    return H, H, config.n_embd // H


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks: Callable[[nn.Module], nn.ModuleList]  # the decoder blocks of a *ForCausalLM model
    attn_name: str  # attribute of the attention module in a block
    projections: tuple[str, ...]  # submodules the new attention reuses under the same names
    dims: Callable[[object], tuple[int, int, int]]  # config -> (heads, kv heads, head dim)
    qkv: Callable[[nn.Module, Tensor, object], tuple[Tensor, Tensor, Tensor]]
    out_proj: str
    absolute_positions: bool = False  # learned position embeddings: no token past the last one exists

    def output(self, m: nn.Module, out: Tensor) -> Tensor:
        return getattr(m, self.out_proj)(_merge(out))


_LLAMA_LIKE = dict(
    blocks=lambda model: model.model.layers,
    attn_name="self_attn",
    projections=("q_proj", "k_proj", "v_proj", "o_proj"),
    dims=_llama_dims,
    qkv=_llama_qkv,
    out_proj="o_proj",
)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", **_LLAMA_LIKE),
    "mistral": Adapter("mistral", **_LLAMA_LIKE),
    "qwen2": Adapter("qwen2", **_LLAMA_LIKE),
    "gpt2": Adapter(
        "gpt2",
        blocks=lambda model: model.transformer.h,
        attn_name="attn",
        projections=("c_attn", "c_proj"),
        dims=_gpt2_dims,
        qkv=_gpt2_qkv,
        out_proj="c_proj",
        absolute_positions=True,
    ),
}


def get_adapter(model_type: str) -> Adapter:
    """The adapter of a transformers ``model_type`` (or of its linconv type)."""
    family = model_type.removeprefix("linconv-")
    if family not in ADAPTERS:
        raise LinconvError(f"unsupported architecture {model_type!r}; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[family]


def position_limit(config) -> int | None:
    """The most tokens a model of ``config`` (base or linconv; a config or config.json's dict) can
    take in one sequence: its positions where they are learned embeddings (GPT-2), None where they
    are rotary and merely degrade past the trained context."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    if not get_adapter(get("model_type")).absolute_positions:
        return None
    return get("max_position_embeddings") or get("n_positions")
