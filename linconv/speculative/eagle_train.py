"""Training an EAGLE head by self-distillation: the target's own greedy continuations, offline.

Data (``distill``): prompts are windows of a text (the built-in training plays by default); the
target continues each greedily, and one forward over prompt + continuation gives its last hidden
states f_t and its top-K next-token candidates with their probabilities. Optionally
(``text_windows``) more windows of the text are read as they are, teacher-forced: the target's
features and distribution on them cost one forward and no generation (EAGLE itself trains on a fixed
dataset). Nothing is downloaded.

Loss (``eagle_loss``), as in EAGLE: from (f_t, x_{t+1}) the head guesses f_{t+1}: a smooth-L1
regression onto the target's f_{t+1} plus ``ce_weight`` × the cross-entropy of the guess's logits
against the target's own next-token distribution at t+1 (its top-K tokens, K = 32, which hold
nearly all of the mass). The logits are those of the draft vocabulary (``draft_vocab`` most frequent
tokens of the distilled data): the head proposes nothing else, and the full 49K-row output head of
the default model made a CPU step several times slower. (A cross-entropy over the K candidates alone
is cheaper still but was measured useless: 28% top-1 among the candidates, 3% over the vocabulary.)
Inputs get Gaussian noise (``noise`` × the features' RMS) so that the head tolerates its own
imperfect guesses when it drafts deeper.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linconv.errors import LinconvError
from linconv.progress import SILENT, Progress
from linconv.speculative.eagle import EagleHead
from linconv.speculative.shape import continue_greedily, spread_windows


@dataclass
class EagleTrainConfig:
    text: str | None = None  # prompt text: None (the built-in train split), a file, a folder or a datasets name
    prompts: int = 64  # prompt windows, spread evenly over the text
    prompt_tokens: int = 64
    new_tokens: int = 192  # the target's greedy continuation of each prompt
    text_windows: int = 0  # more windows (prompt_tokens + new_tokens tokens each) read as they are, teacher-forced
    candidates: int = 32  # K: the target's top-K tokens kept per position for the cross-entropy
    draft_vocab: int = 8192  # tokens the head may propose: the most frequent in the distilled data (0: all)
    steps: int = 300
    batch_size: int = 4  # sequences per step
    lr: float = 1e-3
    ce_weight: float = 0.1  # EAGLE's weighting of the token loss against the feature regression
    noise: float = 0.1  # std of the input-feature noise, relative to the features' RMS
    generate_batch: int = 16  # prompts continued together
    seed: int = 0

    def validate(self) -> EagleTrainConfig:
        for name in ("prompts", "prompt_tokens", "new_tokens", "candidates", "steps", "batch_size", "generate_batch"):
            if getattr(self, name) <= 0:
                raise LinconvError(f"EAGLE training: {name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.text_windows < 0:
            raise LinconvError(f"EAGLE training: text-windows must be >= 0, got {self.text_windows}")
        if self.draft_vocab < 0:
            raise LinconvError(f"EAGLE training: draft-vocab must be >= 0 (0: the whole vocabulary), got {self.draft_vocab}")
        if not self.lr > 0 or self.ce_weight < 0 or self.noise < 0:
            raise LinconvError("EAGLE training: lr must be > 0, ce-weight and noise >= 0")
        return self


@dataclass
class Distilled:
    """Self-distilled sequences with the target's view of them (the training set of the head)."""

    ids: Tensor  # [N, T] prompt + the target's greedy continuation
    features: Tensor  # [N, T, D] the target's last hidden states
    candidates: Tensor  # [N, T, K] the target's top-K next tokens at each position (argmax first)
    probs: Tensor  # [N, T, K] their probabilities, renormalised over the K

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: Tensor) -> Distilled:
        return Distilled(self.ids[index], self.features[index], self.candidates[index], self.probs[index])

    def __add__(self, other: Distilled) -> Distilled:
        return Distilled(*(torch.cat([getattr(self, f), getattr(other, f)]) for f in ("ids", "features", "candidates", "probs")))


@dataclass
class EagleTrainResult:
    head: EagleHead
    losses: list[float] = field(default_factory=list)  # per step
    accuracy: float = 0.0  # the head's first guess is the target's token (training data, depth 1, after training)
    distill_s: float = 0.0  # generating continuations and features
    train_s: float = 0.0
    tokens: int = 0  # distilled tokens

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.head.parameters())


@torch.inference_mode()
def target_view(model: nn.Module, ids: Tensor, candidates: int) -> tuple[Tensor, Tensor, Tensor]:
    """(features [B, T, D], top-K tokens [B, T, K], their renormalised probabilities) of ``model`` on ids."""
    features = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    tops, probs = [], []
    for row in features:  # one row of full-vocabulary logits at a time
        top = head(row).float().softmax(-1).topk(candidates)
        tops.append(top.indices)
        probs.append(top.values / top.values.sum(-1, keepdim=True))
    return features, torch.stack(tops), torch.stack(probs)


def distill(
    model: nn.Module, prompts: Tensor, cfg: EagleTrainConfig, progress: Progress = SILENT, new_tokens: int | None = None
) -> Distilled:
    """The target's greedy continuations of ``prompts`` [N, P] by ``new_tokens`` (default
    ``cfg.new_tokens``; 0: the prompts as they are, teacher-forced) and its view of them."""
    new_tokens = cfg.new_tokens if new_tokens is None else new_tokens
    task = "distilling" if new_tokens else "reading text"
    parts: list[tuple[Tensor, ...]] = []
    progress.start(task, prompts.shape[0])
    device = next(model.parameters()).device
    for s in range(0, prompts.shape[0], cfg.generate_batch):
        ids = prompts[s : s + cfg.generate_batch].to(device)
        if new_tokens:
            ids = continue_greedily(model, ids, new_tokens, cfg.generate_batch)
        parts.append((ids, *target_view(model, ids, cfg.candidates)))
        progress.update(task, s + ids.shape[0])
    progress.end(task)
    return Distilled(*(torch.cat(p) for p in zip(*parts)))


def frequent_tokens(ids: Tensor, vocab_size: int, size: int) -> Tensor | None:
    """The ``size`` most frequent token ids of ``ids`` (ties and unseen tokens: lowest id first, which
    for BPE vocabularies is roughly merge order, i.e. frequency); None when that is every token."""
    if not size or size >= vocab_size:
        return None
    counts = torch.bincount(ids.flatten().cpu(), minlength=vocab_size)
    return torch.sort(-counts, stable=True).indices[:size].sort().values


def eagle_loss(head: EagleHead, data: Distilled, ce_weight: float = 0.1, noise: float = 0.0) -> tuple[Tensor, Tensor]:
    """(loss, top-1 accuracy) of the head on a batch: from (f_t, x_{t+1}) guess f_{t+1}, smooth-L1 to
    the target's plus ``ce_weight`` × cross-entropy against the target's top-K distribution at t+1
    (restricted to the draft vocabulary and renormalised; positions whose candidates all lie outside
    it are left out), over the draft vocabulary's logits. Accuracy: the head's first guess is the
    target's token."""
    features = data.features[:, :-1].float()
    if noise:
        features = features + noise * features.pow(2).mean().sqrt() * torch.randn_like(features)
    guess = head(features, data.ids[:, 1:])  # [B, T-1, D]
    regression = F.smooth_l1_loss(guess.float(), data.features[:, 1:].float())
    logits = head.vocab_logits(guess)  # [B, T-1, V_draft]
    index = head.vocab_index(data.candidates[:, 1:])  # [B, T-1, K], −1 outside the draft vocabulary
    probs = data.probs[:, 1:] * (index >= 0)
    mass = probs.sum(-1)
    target = torch.zeros_like(logits).scatter_add_(-1, index.clamp(min=0), probs)
    ce = -(target * logits.log_softmax(-1)).sum(-1) / mass.clamp(min=1e-6)
    kept = mass > 0
    ce = ce[kept].mean() if kept.any() else ce.sum() * 0
    accuracy = (logits.argmax(-1) == index[..., 0]).float().mean()  # candidates come sorted: the target's argmax first
    return regression + ce_weight * ce, accuracy.detach()


def eagle_setup(
    model: nn.Module, tokenizer, cfg: EagleTrainConfig, *, head: EagleHead | None = None, progress: Progress = SILENT
) -> tuple[EagleHead, Distilled]:
    """What training needs: a head for ``model`` (new, or ``head`` continued) with its draft vocabulary
    set, and the distilled data (the target's greedy continuations of ``cfg.text``'s windows)."""
    model.eval()
    data = distill(model, spread_windows(tokenizer, cfg.text, "train", cfg.prompts, cfg.prompt_tokens), cfg, progress)
    if cfg.text_windows:
        text = spread_windows(tokenizer, cfg.text, "train", cfg.text_windows, cfg.prompt_tokens + cfg.new_tokens)
        data = data + distill(model, text, cfg, progress, new_tokens=0)
    head = head or EagleHead.for_model(model)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    head.set_vocab(frequent_tokens(torch.cat([data.ids.flatten(), data.candidates[..., 0].flatten()]), vocab_size, cfg.draft_vocab))
    return head, data


def train_eagle(
    model: nn.Module, tokenizer, cfg: EagleTrainConfig | None = None, *, head: EagleHead | None = None, progress: Progress = SILENT
) -> EagleTrainResult:
    """Train an EAGLE head for ``model`` (frozen) on its own greedy continuations of ``cfg.text``'s windows.

    ``head`` continues an existing head. Returns the head (in eval mode, attached to ``model``) and
    the training figures; saving is the caller's (:func:`linconv.speculative.eagle.save_eagle`)."""
    cfg = (cfg or EagleTrainConfig()).validate()
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    head, data = eagle_setup(model, tokenizer, cfg, head=head, progress=progress)
    result = EagleTrainResult(head, distill_s=time.perf_counter() - start, tokens=data.ids.numel())
    head.train()
    params = list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps, eta_min=0.1 * cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(len(data), generator=g) for _ in range(cfg.steps * cfg.batch_size // len(data) + 1)])
    start = time.perf_counter()
    progress.start("training EAGLE head", cfg.steps)
    for step in range(cfg.steps):
        batch = data.rows(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
        loss, accuracy = eagle_loss(head, batch, cfg.ce_weight, cfg.noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        progress.update("training EAGLE head", step + 1, loss=result.losses[-1], accuracy=float(accuracy))
    progress.end("training EAGLE head")
    result.train_s = time.perf_counter() - start
    head.eval()
    with torch.no_grad():
        result.accuracy = float(torch.stack([eagle_loss(head, data.rows(torch.tensor([i])))[1] for i in range(len(data))]).mean())
    return result
