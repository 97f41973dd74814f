"""Benchmark the linear-attention ops against causal SDPA (run by hand; pytest ignores this folder).

Measures, at the default model's head shape (B=1, H=9, D=64):

1. Full-sequence forward at each T: chunked ``linear_attention`` (φ = elu+1 on q and k, included
   in the timing), ``grouped_attention`` (unit q/k, G=64, relu² local score, φ = relu) and
   ``scaled_dot_product_attention(is_causal=True)``: median wall time after a warm-up, and peak
   memory of one call. On CPU the peak is the RSS high-water increase of one call in a fresh
   ``spawn`` child per (op, T), so earlier allocations do not pollute it; on CUDA it is
   ``torch.cuda.max_memory_allocated`` above the inputs.
2. Per-token decoding: ``linear_attention_step`` and ``grouped_attention`` with T=1, continuing from
   states built from 1K and 16K tokens; median over ``--steps`` steps (it should not depend on T).

Prints rich tables, then one JSON object with every figure as the last line. Run:

    python tests/benchmarks/bench_ops.py [--device cpu|cuda] [--dtype fp32|bf16]
        [--lengths 1024,4096,16384] [--repeats 5] [--chunk-size 64] [--steps 200]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from linconv.ops import grouped_attention, linear_attention, linear_attention_step

B, H, D, GROUP = 1, 9, 64, 64
OPS = ("chunked", "grouped", "sdpa")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def inputs(T: int, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, generator=g).to(device, dtype) for _ in range(3))


def make_op(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int):
    """A zero-argument callable running one full-sequence forward of ``name``."""
    if name == "chunked":
        return lambda: linear_attention(phi(q), phi(k), v, chunk_size=chunk)
    if name == "grouped":
        qu, ku = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return lambda: grouped_attention(qu, ku, v, group_size=GROUP, score="relu2", phi=torch.relu)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cpu_peak_child(name: str, T: int, dtype: str, chunk: int) -> float:
    """In a fresh process: RSS high-water increase (MB) of one call, inputs already allocated."""
    with torch.inference_mode():
        make_op(name, *inputs(64, "cpu", DTYPES[dtype]), chunk)()  # initialise kernels/threads cheaply
        op = make_op(name, *inputs(T, "cpu", DTYPES[dtype]), chunk)
        gc.collect()
        try:  # reset VmHWM to the current RSS (Linux >= 4.0); else fall back to the peak so far
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = status_kb("VmRSS")
        except OSError:
            base = status_kb("VmHWM")
        out = op()
        peak = status_kb("VmHWM")
        del out
    return (peak - base) / 1024


def peak_mb(name: str, T: int, args) -> float:
    if args.device == "cuda":
        with torch.inference_mode():
            op = make_op(name, *inputs(T, "cuda", DTYPES[args.dtype]), args.chunk_size)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = op()
            torch.cuda.synchronize()
            del out
            return (torch.cuda.max_memory_allocated() - base) / 2**20
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(cpu_peak_child, (name, T, args.dtype, args.chunk_size))


def step_ms(name: str, context: int, args) -> float:
    """Median time of one decoding step, continuing from a state built from ``context`` tokens."""
    dt = DTYPES[args.dtype]
    q, k, v = inputs(context + args.steps, args.device, dt)
    if name == "chunked":
        q, k = phi(q), phi(k)
        _, state = linear_attention(q[:, :, :context], k[:, :, :context], v[:, :, :context], chunk_size=args.chunk_size)
        step = lambda s, t: linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], s)  # noqa: E731
    else:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        kw = dict(group_size=GROUP, score="relu2", phi=torch.relu)
        _, state = grouped_attention(q[:, :, :context], k[:, :, :context], v[:, :, :context], **kw)
        step = lambda s, t: grouped_attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], s, **kw)  # noqa: E731
    times = []
    for t in range(context, context + args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        _, state = step(state, t)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[10:]) * 1e3  # the first few steps warm up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--lengths", default="1024,4096,16384", help="comma-separated sequence lengths")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    console = Console()
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
           "dtype": args.dtype, "shape": {"B": B, "H": H, "D": D}, "chunk_size": args.chunk_size,
           "group_size": GROUP, "repeats": args.repeats, "forward": {}, "step_ms": {}}
    if args.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()

    table = Table(title=f"Full-sequence forward, B={B} H={H} D={D} {args.dtype} on {args.device}")
    for col in ("T", "op", "median ms", "peak MB", "speedup vs SDPA"):
        table.add_column(col, justify="right")
    for T in lengths:
        row = res["forward"][str(T)] = {}
        # SDPA is quadratic: fewer repeats at long T keeps the CPU run short
        reps = {op: args.repeats if op != "sdpa" or T < 8192 else max(1, min(args.repeats, 2)) for op in OPS}
        with torch.inference_mode():
            for op in OPS:
                fn = make_op(op, *inputs(T, args.device, DTYPES[args.dtype]), args.chunk_size)
                row[op] = {"ms": median_ms(fn, args.device, reps[op]), "repeats": reps[op]}
                del fn
                gc.collect()
        for op in OPS:
            row[op]["peak_mb"] = peak_mb(op, T, args)
        row["speedup_chunked_vs_sdpa"] = row["sdpa"]["ms"] / row["chunked"]["ms"]
        row["speedup_grouped_vs_sdpa"] = row["sdpa"]["ms"] / row["grouped"]["ms"]
        for op in OPS:
            ratio = f"{row['sdpa']['ms'] / row[op]['ms']:.2f}x" if op != "sdpa" else ""
            table.add_row(str(T), op, f"{row[op]['ms']:.2f}", f"{row[op]['peak_mb']:.1f}", ratio)
        table.add_section()
        console.print(f"[dim]T={T} done[/dim]")
    console.print(table)

    steps = Table(title=f"Per-token decoding step (median of {args.steps - 10}), ms")
    for col in ("context", "linear_attention_step", "grouped_attention T=1"):
        steps.add_column(col, justify="right")
    with torch.inference_mode():
        for ctx in (1024, 16384):
            res["step_ms"][str(ctx)] = {op: step_ms(op, ctx, args) for op in ("chunked", "grouped")}
            s = res["step_ms"][str(ctx)]
            steps.add_row(str(ctx), f"{s['chunked']:.4f}", f"{s['grouped']:.4f}")
    console.print(steps)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
