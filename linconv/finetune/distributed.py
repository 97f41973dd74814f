"""Data parallel without a DDP wrapper: the accelerator, one all-reduce per optimizer step, barriers.

Every process takes its own windows of each step, and the gradients of the (small) trainable set are
averaged with one all-reduce per optimizer step. So any submodule can be called directly (the decoder
without its output head) and the same code runs in one process or under ``accelerate launch`` /
``torchrun`` (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor

from linconv.errors import LinconvError
from linconv.finetune.config import PRECISIONS, FinetuneConfig


def accelerator(cfg: FinetuneConfig, device: str | torch.device | None) -> Accelerator:
    """The accelerator for ``device`` ("cpu", "cuda", "cuda:N" or None/"auto") and ``cfg.dtype``."""
    name = str(device) if device is not None else "auto"
    cuda = torch.cuda.is_available() if name == "auto" else name.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise LinconvError("--device cuda requested but no CUDA device is available")
    if name.startswith("cuda:"):
        torch.cuda.set_device(torch.device(name))
    precision = PRECISIONS[cfg.dtype]
    if precision != "no" and not cuda:
        raise LinconvError(f"--dtype {cfg.dtype} (autocast) needs a CUDA device; on CPU train in fp32")
    return Accelerator(cpu=not cuda, mixed_precision=precision)


def all_reduce(params: list[Tensor], loss: Tensor, stop: bool, world: int) -> tuple[float, bool]:
    """Average gradients and loss over the ``world`` processes; any process's stop request stops all."""
    if world == 1:
        return loss.item(), stop
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.reshape(1).float(), loss.new_tensor([float(stop)])])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).div_(world).to(g.dtype)
        offset += g.numel()
    return flat[-2].item() / world, flat[-1].item() > 0


def barrier(acc: Accelerator) -> None:
    """Wait for every process (nothing to wait for in a single one)."""
    if acc.num_processes > 1:
        acc.wait_for_everyone()
