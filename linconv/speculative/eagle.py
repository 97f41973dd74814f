"""EAGLE-style draft head (Li et al. 2024): one decoder block that drafts from the target's features.

At position t the head reads the target's last hidden state f_t (after the final norm: the input of
the output head) and the embedding of token t+1, mixes them with ``fc([f_t; e(x_{t+1})])``, runs ONE
decoder block of the target's own family whose attention is linconv's linear attention (a one-layer
model of the family converted with the target's LinearizeConfig, so its decoding state is O(1) like
the target's) and the family's final norm, and so guesses f_{t+1}; the target's own output head
(frozen, shared) turns the guess into logits for token t+2. Deeper guesses feed the head its own
output: (g_{t+1}, x_{t+2}) -> g_{t+2} -> token t+3, and so on.

The head's recurrent state only ever holds committed pairs (f_i, x_{i+1}) with the target's true
features: ``advance`` queues them as the target commits tokens, ``propose`` folds them in, then
drafts a tree through the attention's tree form, which never touches the state, so a rejected branch
leaves no trace. On disk beside a checkpoint: ``eagle.safetensors`` (fc, block, norm; embeddings and
output head are the model's) and ``eagle.json`` (the one-layer config, format, measured tree).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig

from linconv.attention.state import LinconvCache
from linconv.config import LinearizeConfig
from linconv.errors import LinconvError, first_line
from linconv.models import get_adapter
from linconv.models.hf import CLASSES, is_linconv
from linconv.ops import tree_depths
from linconv.speculative.files import read_config, read_weights, stored_widths, write_draft
from linconv.speculative.shape import check_widths

EAGLE_WEIGHTS = "eagle.safetensors"
EAGLE_CONFIG = "eagle.json"
FORMAT_VERSION = 1
DEFAULT_WIDTHS = (4, 2, 2, 1)  # used until a tree is measured (see linconv.speculative.shape)
FOLD_EAGERLY = 32  # queued pairs beyond this are folded by advance itself
_NOT_COPIED = ("model_type", "architectures", "transformers_version", "quantization_config", "linconv", "layer_types")


def draft_config(config: PretrainedConfig, linearize: LinearizeConfig | None = None) -> PretrainedConfig:
    """The one-layer linconv config of the head: ``config``'s family and sizes, one layer, a vocabulary
    of one (the embeddings and output head are the target's), every layer linear.

    ``linearize`` defaults to the target's own options (a linconv target) or linconv's defaults."""
    family = get_adapter(config.model_type).family
    if linearize is None:
        linearize = LinearizeConfig.from_dict(config.linconv) if is_linconv(config) else LinearizeConfig()
    linearize = replace(linearize, keep_softmax_layers=[], softmax_every=0, source=None)
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_COPIED}
    fields.update(num_hidden_layers=1, vocab_size=1, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    config_cls, _ = CLASSES[family]
    return config_cls(**fields, linconv=linearize.to_dict())


class EagleHead(nn.Module):
    """``fc`` [2D -> D] and a one-layer decoder (block + final norm, no embeddings) of the target's family.

    ``forward(features, tokens)`` gives the head's guess of the next features [B, T, D]; ``logits(g)``
    sends a guess through the attached output head. ``attach(model)`` shares the target's input
    embeddings and output head, kept out of the state dict (like Medusa heads).
    """

    def __init__(self, config: PretrainedConfig, vocab_size: int | None = None):
        super().__init__()
        _, model_cls = CLASSES[get_adapter(config.model_type).family]
        lm = model_cls(config)
        self.decoder = getattr(lm, lm.base_model_prefix)
        self.decoder.set_input_embeddings(None)
        self.block_name = next(n for n, m in self.decoder.named_modules() if m is get_adapter(config.model_type).blocks(lm)[0])
        self.hidden_size = config.hidden_size
        self.fc = nn.Linear(2 * self.hidden_size, self.hidden_size)
        # the draft vocabulary: token ids the head may propose (None: all); see set_vocab
        self.register_buffer("vocab", None if vocab_size is None else torch.zeros(vocab_size, dtype=torch.long))
        self._shared: list[nn.Module] = []  # [input embeddings, output head] of the target
        self._rows: list[Tensor] = []  # the output head's rows of the draft vocabulary (weight, bias)

    @classmethod
    def for_model(cls, model: nn.Module, linearize: LinearizeConfig | None = None) -> EagleHead:
        """A new head for ``model`` on its device and dtype, its block and norm copied from the target's
        last block and final norm (a block that already maps this model's features: training starts
        near something sensible), attached to the target's embeddings and output head."""
        ref = model.get_output_embeddings().weight
        with torch.device(ref.device):
            head = cls(draft_config(model.config, linearize)).to(ref.dtype)
        head._copy_last_block(model)
        return head.attach(model)

    def _copy_last_block(self, model: nn.Module) -> None:
        base = model.base_model
        last = get_adapter(model.config.model_type).blocks(model)[-1]
        source = next(n for n, m in base.named_modules() if m is last)
        # under peft (the finetune stage after LoRA) a projection's own weight is "….base_layer.weight":
        # the head copies it without the adapters' small low-rank change
        theirs = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items()}
        mine = self.decoder.state_dict()
        copied = {}
        for key, value in mine.items():
            src = source + key.removeprefix(self.block_name) if key.startswith(self.block_name + ".") else key
            if src in theirs and theirs[src].shape == value.shape:
                copied[key] = theirs[src]
        self.decoder.load_state_dict(copied, strict=False)

    def attach(self, model: nn.Module) -> EagleHead:
        """Share ``model``'s input embeddings and output head; returns self."""
        head = model.get_output_embeddings()
        if head is None or head.weight.shape[1] != self.hidden_size:
            raise LinconvError(f"the model's output head does not take hidden size {self.hidden_size} (an EAGLE head of another model?)")
        self._shared = [model.get_input_embeddings(), head]
        self._rows = []
        return self

    def set_vocab(self, ids: Tensor | None) -> EagleHead:
        """Draft only tokens ``ids`` (None: the whole vocabulary); returns self.

        The output head is most of a draft step's work (49K rows x 576 on the default model: 51 ms
        for 8 nodes on a loaded CPU against 3.8 ms for the 8K most frequent tokens), and a guess the
        target rarely makes is rarely accepted anyway (EAGLE-3 drafts from a reduced vocabulary too).
        """
        self.vocab = None if ids is None else ids.to(device=self.fc.weight.device, dtype=torch.long)
        self._rows = []
        return self

    @property
    def embeddings(self) -> nn.Module:
        """The target's input embeddings."""
        return self._target(0)

    @property
    def output_head(self) -> nn.Module:
        """The target's output head."""
        return self._target(1)

    def _target(self, i: int) -> nn.Module:
        if not self._shared:
            raise LinconvError("the EAGLE head is not attached to a model; call head.attach(model) first")
        return self._shared[i]

    def forward(self, features: Tensor, tokens: Tensor, cache=None, position_ids: Tensor | None = None) -> Tensor:
        """features [B, T, D] (f_t), tokens [B, T] (x_{t+1}) -> the head's guesses of f_{t+1} [B, T, D]."""
        embedded = self.embeddings(tokens)
        x = self.fc(torch.cat([features.to(embedded.dtype), embedded], -1))
        out = self.decoder(inputs_embeds=x, position_ids=position_ids, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def logits(self, guess: Tensor) -> Tensor:
        """Logits [..., V] of a guess [..., D] through the target's output head (fp32); with a draft
        vocabulary, only its rows are computed and every other token gets −inf."""
        if self.vocab is None:
            return self.output_head(guess).float()
        out = torch.full((*guess.shape[:-1], self.output_head.weight.shape[0]), float("-inf"), device=guess.device)
        out[..., self.vocab] = self.vocab_logits(guess)
        return out

    def vocab_logits(self, guess: Tensor) -> Tensor:
        """Logits [..., V_draft] (fp32) of the draft vocabulary's tokens only, in ``vocab`` order."""
        if self.vocab is None:
            return self.output_head(guess).float()
        if not self._rows:  # a copy of the head's rows, made once (the target is frozen)
            bias = getattr(self.output_head, "bias", None)
            self._rows = [self.output_head.weight[self.vocab].detach(), *([] if bias is None else [bias[self.vocab].detach()])]
        return F.linear(guess, *self._rows).float()

    def vocab_index(self, tokens: Tensor) -> Tensor:
        """Each token's index in the draft vocabulary, −1 for tokens outside it."""
        if self.vocab is None:
            return tokens
        index = torch.full((self.output_head.weight.shape[0],), -1, dtype=torch.long, device=tokens.device)
        index[self.vocab] = torch.arange(self.vocab.numel(), device=tokens.device)
        return index[tokens]

    def config(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "hidden_size": self.hidden_size,
            "vocab_size": None if self.vocab is None else self.vocab.numel(),  # the draft vocabulary's
            "decoder": self.decoder.config.to_dict(),
            "predicts": "the target's next last-hidden-state, and through its output head token t+2",
        }


def save_eagle(head: EagleHead, folder: str | Path, extra: dict | None = None) -> Path:
    """Write the head beside a checkpoint: weights first, then eagle.json (plus ``extra`` fields)."""
    return write_draft(folder, EAGLE_WEIGHTS, head.state_dict(), EAGLE_CONFIG, head.config() | (extra or {}))


def has_eagle(folder: str | Path | None) -> bool:
    return folder is not None and (Path(folder) / EAGLE_CONFIG).is_file()


def eagle_config(folder: str | Path) -> dict:
    """The eagle.json saved beside the checkpoint ``folder``; a one-line LinconvError when there is none."""
    missing = f"EAGLE head ({EAGLE_CONFIG} missing); train one with `linconv finetune --draft-head eagle`"
    return read_config(folder, EAGLE_CONFIG, missing, FORMAT_VERSION)


def load_eagle(folder: str | Path, model: nn.Module) -> EagleHead:
    """The EAGLE head saved beside the checkpoint ``folder``, attached to ``model`` (its device and dtype)."""
    cfg = eagle_config(folder)
    try:
        decoder = dict(cfg["decoder"])
        config_cls, _ = CLASSES[get_adapter(decoder.pop("model_type")).family]
        config = config_cls(**{k: v for k, v in decoder.items() if k != "transformers_version"})
        vocab_size = None if cfg.get("vocab_size") is None else int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError, LinconvError) as e:
        raise LinconvError(f"cannot read {Path(folder) / EAGLE_CONFIG}: {first_line(e)}") from None
    ref = model.get_output_embeddings().weight
    with torch.device(ref.device):
        head = EagleHead(config, vocab_size).to(ref.dtype)
    try:
        head.load_state_dict(read_weights(folder, EAGLE_WEIGHTS))
    except RuntimeError as e:
        raise LinconvError(f"cannot load {Path(folder) / EAGLE_WEIGHTS}: {first_line(e)}") from None
    return head.attach(model).eval()


Pick = Callable[[int, Tensor], list[list[int]]]  # (depth, logits [n, V]) -> child tokens per frontier node


class EagleDraft:
    """The draft protocol around an :class:`EagleHead`: ``advance`` on committed tokens, ``propose``
    a tree of the top ``widths[d]`` tokens at depth d below every node of depth d − 1."""

    def __init__(self, head: EagleHead, widths: Sequence[int] = DEFAULT_WIDTHS):
        check_widths(widths, head.output_head.weight.shape[0])
        self.head, self.widths = head, list(widths)
        self.reset()

    def reset(self) -> None:
        """Forget every committed token: the state of a new sequence."""
        self.cache = LinconvCache(1)
        self._tokens: list[int] = []  # committed tokens whose pair is not folded in yet
        self._features: list[Tensor] = []  # and the target's features of them

    def advance(self, tokens: Sequence[int], hiddens: Tensor) -> None:
        """The target committed ``tokens``; ``hiddens`` [len, D] are its last hidden states there."""
        if len(tokens) != hiddens.shape[0]:
            raise LinconvError(f"advance got {len(tokens)} tokens but {hiddens.shape[0]} hidden states")
        self._tokens += list(tokens)
        self._features.append(hiddens)
        if len(self._tokens) > FOLD_EAGERLY:  # a prompt: fold it now (prefill), not in the first propose
            features = torch.cat(self._features)
            with torch.inference_mode():
                self.head(features[None, :-1], torch.tensor([self._tokens[1:]], device=features.device), cache=self.cache)
            self._tokens, self._features = self._tokens[-1:], [features[-1:]]

    @torch.inference_mode()
    def propose(self, context: Sequence[int], hidden: Tensor | None = None) -> list[list[int]]:
        guess = self._fold(context[-1])
        tokens, parents, _ = self._expand(guess, len(self.widths), lambda d, logits: logits.topk(self.widths[d]).indices.tolist())
        leaves = set(range(len(tokens))) - set(parents)
        paths = []
        for leaf in sorted(leaves):
            path, node = [], leaf
            while node >= 0:
                path.append(tokens[node])
                node = parents[node]
            paths.append(path[::-1])
        return paths

    @torch.inference_mode()
    def path_logits(self, context: Sequence[int], hidden: Tensor | None, path: Sequence[int]) -> Tensor:
        """The head's logits [len(path), V] at each depth along ``path`` (the tree-shape measurement)."""
        guess = self._fold(context[-1])
        return torch.cat(self._expand(guess, len(path), lambda d, logits: [[path[d]]])[2])

    def _fold(self, root: int) -> Tensor:
        """Fold the queued pairs (f_i, x_{i+1}), the last one with the root, into the state; returns
        the head's guess [D] of the root's features (whose logits give depth 1)."""
        if not self._features:
            raise LinconvError("the EAGLE draft needs the target's hidden states: the decode loop must call draft.advance")
        features = torch.cat(self._features)
        tokens = torch.tensor([[*self._tokens[1:], root]], device=features.device)
        self._tokens, self._features = [], []
        return self.head(features[None], tokens, cache=self.cache)[0, -1]

    def _expand(self, guess: Tensor, depth: int, pick: Pick) -> tuple[list[int], list[int], list[Tensor]]:
        """Draft ``depth`` levels below the root, children chosen by ``pick``; returns the draft nodes'
        tokens and parents (−1: a child of the root) and the logits of every level."""
        tokens: list[int] = []
        parents: list[int] = []
        inputs: list[Tensor] = []  # per node: its parent's guessed features
        frontier, guesses, levels = [-1], guess[None], []
        for d in range(depth):
            logits = self.head.logits(guesses)
            levels.append(logits)
            new = []
            for node, g, children in zip(frontier, guesses, pick(d, logits)):
                for tok in children:
                    new.append(len(tokens))
                    tokens.append(int(tok))
                    parents.append(node)
                    inputs.append(g)
            if d + 1 < depth:
                frontier, guesses = new, self._tree(tokens, parents, inputs)[new]
        return tokens, parents, levels

    def _tree(self, tokens: list[int], parents: list[int], inputs: list[Tensor]) -> Tensor:
        """The head's guesses [N, D] at every draft node, each as if its path had been decoded; the
        state is left as it was (the attention's tree form)."""
        past = self.cache.get_seq_length()
        device = inputs[0].device
        positions = torch.tensor([[past + d - 1 for d in tree_depths(parents)]], device=device)
        self.cache.begin_tree(parents)
        try:
            return self.head(torch.stack(inputs)[None], torch.tensor([tokens], device=device), self.cache, positions)[0]
        finally:
            self.cache.rollback()


def eagle_draft(folder: str | Path, model: nn.Module, widths: Sequence[int] | None = None) -> EagleDraft:
    """The EAGLE draft of checkpoint ``folder``: ``widths`` if given, else the measured tree stored
    with the head, else DEFAULT_WIDTHS."""
    head = load_eagle(folder, model)
    return EagleDraft(head, widths or stored_widths(folder, EAGLE_CONFIG) or DEFAULT_WIDTHS)
