"""The training loop of one stage: AdamW with warm-up then cosine, gradient accumulation, one all-reduce
per step, held-out evaluation, and Ctrl-C that stops after the current step with a resume state.

The RNG is reseeded from (seed, stage number, step, rank) at every step, so a resumed run continues
exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from linconv.attention.module import LinconvAttention
from linconv.bench.perplexity import perplexity
from linconv.finetune.config import FinetuneConfig, StageResult
from linconv.finetune.data import WindowOrder, mix
from linconv.finetune.distributed import all_reduce, barrier
from linconv.finetune.stages import Stage
from linconv.progress import Progress

# save(step, optimizer states): write a resume state after ``step`` of the stage being trained
SaveState = Callable[[int, dict[str, Any]], None]


def schedule(total: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor of each step: linear warm-up over ``warmup`` of the steps, then cosine to 10%."""
    w = int(total * warmup)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / (w + 1)
        progress = (step - w) / max(1, total - w)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """Trains stages on ``model``; only the main process reports to ``progress`` and evaluates."""

    def __init__(
        self,
        acc: Accelerator,
        cfg: FinetuneConfig,
        model: nn.Module,
        order: WindowOrder,
        heldout: Tensor | None,
        progress: Progress,
        partial: Path,
        evals: list[dict],
    ):
        self.acc, self.cfg, self.model, self.order, self.heldout = acc, cfg, model, order, heldout
        self.progress, self.partial = progress, partial  # partial: where the resume state goes (for the messages)
        self.main, self.world, self.rank = acc.is_main_process, acc.num_processes, acc.process_index
        self.stop = False  # set by Ctrl-C: stop after the current step
        self.evals = evals  # {"stage", "step", "perplexity"}, those of an interrupted run first

    def train(self, stage: Stage, total: int, start: int, result: StageResult, resumed: dict | None, save: SaveState) -> None:
        """Steps ``start`` to ``total`` of ``stage`` (set up), continuing the ``resumed`` optimizer states if given."""
        cfg, acc = self.cfg, self.acc
        params = [p for _, p in stage.trainable]
        optimizer = torch.optim.AdamW(params, lr=stage.lr(cfg), weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(total, cfg.warmup))
        optimizer = acc.prepare_optimizer(optimizer)
        if resumed is not None:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            if acc.scaler is not None and resumed.get("scaler"):
                acc.scaler.load_state_dict(resumed["scaler"])
        order = stage.data(self.order)
        tokens_per_step = stage.step_tokens() * self.world
        if self.main:
            self.progress.start(stage.name, total, start)
        for step in range(start, total):
            t0 = time.perf_counter()
            loss, stop = self._step(stage, order, step, params)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done, seconds = step + 1, time.perf_counter() - t0
            result.losses.append(loss)
            result.seconds += seconds
            result.tokens += tokens_per_step
            if self.main:
                lr = scheduler.get_last_lr()[0]
                self.progress.update(stage.name, done, total, loss=loss, lr=lr, tok_s=tokens_per_step / seconds)
            if self.heldout is not None and done % cfg.eval_every == 0 and done < total:
                self.evaluate(stage.name, done)
            if self.world == 1:
                stop = self.stop  # a Ctrl-C during this step (several processes agree on it in the next all-reduce)
            if stop or (cfg.save_every and done % cfg.save_every == 0 and done < total):
                scaler = acc.scaler.state_dict() if acc.scaler is not None else None
                save(done, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler})
            if stop:
                if self.main:
                    self.progress.message(
                        f"interrupted after step {done} of {stage.name}; resume state saved in {self.partial} (continue with --resume)"
                    )
                raise KeyboardInterrupt
        if self.main:
            self.progress.end(stage.name)

    def _step(self, stage: Stage, order: WindowOrder, step: int, params: list[Tensor]) -> tuple[float, bool]:
        """Forward and backward of every micro-step, averaged over processes and clipped: (mean loss, stop)."""
        cfg, acc = self.cfg, self.acc
        torch.manual_seed(mix(cfg.seed, stage.number, step, self.rank))
        loss_sum = torch.zeros((), device=acc.device)
        for micro in range(cfg.grad_accum):
            ids = order.batch(stage.number, step, micro).to(acc.device)
            with acc.autocast():
                loss = stage.loss(ids)
            acc.backward(loss / cfg.grad_accum)
            loss_sum += loss.detach().float()
        mean_loss, stop = all_reduce(params, loss_sum / cfg.grad_accum, self.stop, self.world)
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(params, cfg.max_grad_norm)
        return mean_loss, stop

    def evaluate(self, stage: str, step: int) -> None:
        """Held-out perplexity of the model now (main process; the others wait)."""
        if self.main:
            training = self.model.training
            self.model.eval()
            assert not any(isinstance(m, LinconvAttention) and m.transfer for m in self.model.modules())
            with self.acc.autocast():
                ppl = perplexity(self.model, self.heldout.flatten(), window=self.cfg.seq_len, batch_size=self.cfg.batch_size).perplexity
            self.model.train(training)
            self.evals.append({"stage": stage, "step": step, "perplexity": ppl})
            where = "before training" if stage == "start" else f"after {stage} step {step}"
            self.progress.message(f"held-out perplexity {where}: {ppl:.3f}")
        barrier(self.acc)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Ctrl-C (or SIGTERM) asks to stop after the current step, saving a resume state; twice aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True
            if self.main:
                self.progress.message("stopping after this step to save a resume state (Ctrl-C again to abort at once)")

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
