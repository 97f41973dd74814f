"""Medusa draft heads (Cai et al. 2024): cheap guesses of tokens t+2 … t+H+1 from one hidden state.

Head i (0-based) maps the model's last hidden state h_t (after the final norm, the input of the
output head) through a small residual block ``h + SiLU(W h + b)`` and then through the model's own
output head, which all heads share, to guess token t+i+2 (the model itself predicts t+1). W and b
start at zero, so at initialisation every head repeats the model's next-token logits.

On disk the heads sit beside a checkpoint: ``medusa.safetensors`` (the residual blocks only; the
output head is the model's) and ``medusa.json`` (sizes and format), written last so that a folder
with ``medusa.json`` always has complete heads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linconv.errors import LinconvError, first_line
from linconv.speculative.files import read_config, read_weights, write_draft

MEDUSA_WEIGHTS = "medusa.safetensors"
MEDUSA_CONFIG = "medusa.json"
FORMAT_VERSION = 1


class ResBlock(nn.Module):
    """x + SiLU(W x + b), zero-initialised: the identity at the start."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """``num_heads`` heads of ``num_layers`` residual blocks each, sharing a model's output head.

    ``hidden(h)`` gives each head's transformed state [K, ..., D]; calling the module gives the
    heads' logits [K, ..., V] through the attached output head (see :meth:`attach`).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_layers: int = 1):
        super().__init__()
        if num_heads <= 0 or num_layers <= 0:
            raise LinconvError(f"Medusa needs at least one head and one layer, got {num_heads} heads, {num_layers} layers")
        self.hidden_size, self.num_heads, self.num_layers = hidden_size, num_heads, num_layers
        self.blocks = nn.ModuleList(nn.Sequential(*(ResBlock(hidden_size) for _ in range(num_layers))) for _ in range(num_heads))
        self._head: list[nn.Module] = []  # the shared output head; a list keeps it out of state_dict

    @classmethod
    def for_model(cls, model: nn.Module, num_heads: int, num_layers: int = 1) -> MedusaHeads:
        """New zero-initialised heads sized for ``model``, attached to its output head, on its device."""
        head = model.get_output_embeddings()
        heads = cls(head.weight.shape[1], num_heads, num_layers).to(head.weight.device)
        return heads.attach(model)

    def attach(self, model_or_head: nn.Module) -> MedusaHeads:
        """Share ``model_or_head``'s output head (a causal LM, or the head module itself); returns self."""
        get = getattr(model_or_head, "get_output_embeddings", None)
        head = get() if get is not None else model_or_head
        if head is None or head.weight.shape[1] != self.hidden_size:
            raise LinconvError(f"the model's output head does not take hidden size {self.hidden_size} (Medusa heads of another model?)")
        self._head = [head]
        return self

    @property
    def head(self) -> nn.Module:
        if not self._head:
            raise LinconvError("Medusa heads are not attached to a model; call heads.attach(model) first")
        return self._head[0]

    def hidden(self, h: Tensor) -> Tensor:
        """h [..., D] -> [K, ..., D]: each head's state before the shared output head."""
        return torch.stack([block(h) for block in self.blocks])

    def forward(self, h: Tensor) -> Tensor:
        """h [..., D] (the model's last hidden state) -> logits [K, ..., V]; head i guesses t+i+2."""
        return self.head(self.hidden(h))

    def config(self) -> dict:
        return {
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "format_version": FORMAT_VERSION,
            "predicts": "tokens t+2..t+H+1 through the model's output head",
        }


def medusa_loss(heads: MedusaHeads, hidden: Tensor, input_ids: Tensor, chunk_tokens: int | None = None) -> Tensor:
    """Sum over heads of the mean cross-entropy of head i's guess at t against token t+i+2.

    ``hidden`` [B, T, D] is the model's last hidden state for ``input_ids`` [B, T]; logits are made
    chunk by chunk (see :func:`linconv.loss.chunked_nll`), never all at once.
    """
    from linconv.loss import chunked_nll

    total = hidden.new_zeros((), dtype=torch.float32)
    for i, block in enumerate(heads.blocks):
        shift = i + 2
        if input_ids.shape[1] <= shift:
            break
        h = block(hidden[:, :-shift]).reshape(-1, hidden.shape[-1])
        targets = input_ids[:, shift:].reshape(-1)
        total = total + chunked_nll(h, targets, heads.head, chunk_tokens) / targets.numel()
    return total


def save_medusa(heads: MedusaHeads, folder: str | Path) -> Path:
    """Write the heads into ``folder`` (beside a checkpoint): weights first, then medusa.json."""
    return write_draft(folder, MEDUSA_WEIGHTS, heads.state_dict(), MEDUSA_CONFIG, heads.config())


def has_medusa(folder: str | Path) -> bool:
    return (Path(folder) / MEDUSA_CONFIG).is_file()


def load_medusa(folder: str | Path, model: nn.Module | None = None, *, device=None, dtype: torch.dtype | None = None) -> MedusaHeads:
    """The Medusa heads saved beside the checkpoint ``folder``; attached to ``model``'s output head
    (and moved to its device and dtype) when given. A one-line LinconvError when there are none."""
    missing = f"Medusa heads ({MEDUSA_CONFIG} missing); train them with `linconv finetune --medusa-heads H`"
    cfg = read_config(folder, MEDUSA_CONFIG, missing, FORMAT_VERSION)
    try:
        heads = MedusaHeads(int(cfg["hidden_size"]), int(cfg["num_heads"]), int(cfg.get("num_layers", 1)))
    except (ValueError, KeyError, TypeError) as e:
        raise LinconvError(f"cannot read {Path(folder) / MEDUSA_CONFIG}: {e}") from None
    try:
        heads.load_state_dict(read_weights(folder, MEDUSA_WEIGHTS))
    except RuntimeError as e:
        raise LinconvError(f"cannot load {Path(folder) / MEDUSA_WEIGHTS}: {first_line(e)}") from None
    if model is not None:
        ref = model.get_output_embeddings().weight
        heads.to(device=device or ref.device, dtype=dtype or ref.dtype).attach(model)
    elif device is not None or dtype is not None:
        heads.to(device=device, dtype=dtype)
    return heads.eval()
