"""Benchmark the linear-attention ops against causal SDPA (run by hand; pytest ignores this folder).

Measures, at the default model's head shape (B=1, H=9, D=64):

1. Full-sequence forward at each T: chunked ``linear_attention`` (φ = elu+1 on q and k, included
   in the timing), ``grouped_attention`` (unit q/k, G=64, relu² local score, φ = relu) and
   ``scaled_dot_product_attention(is_causal=True)``: median (and min) wall time after a warm-up,
   repeats interleaved across the ops so background load hits them alike, and the peak
   memory of one call. On CPU the peak is the RSS high-water increase of one call in a fresh
   ``spawn`` child per (op, T), so earlier allocations do not pollute it; on CUDA it is
   ``torch.cuda.max_memory_allocated`` above the inputs.
2. Per-token decoding: ``linear_attention_step`` and ``grouped_attention`` with T=1, continuing from
   states built from 1K and 16K tokens (φ/normalisation applied beforehand, not timed); median
   over ``--steps`` steps, alternating the two contexts (it should not depend on the context).

Prints rich tables, then one JSON object with every figure as the last line. Run:

    python tests/benchmarks/bench_ops.py [--device cpu|cuda] [--dtype fp32|bf16]
        [--lengths 1024,4096,16384] [--repeats 5] [--chunk-size 128] [--steps 200]
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
GROUPED = {"group_size": GROUP, "score": "relu2", "phi": torch.relu}


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
        return lambda: grouped_attention(qu, ku, v, **GROUPED)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    """(milliseconds, result) of one call of ``fn``."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def forward_ms(T: int, args) -> dict[str, dict]:
    """Median/min ms per op at length T, repeats interleaved across the ops."""
    fns = {op: make_op(op, *inputs(T, args.device, DTYPES[args.dtype]), args.chunk_size) for op in OPS}
    # SDPA is quadratic: fewer repeats at long T keep the CPU run short
    reps = {op: args.repeats if op != "sdpa" or T < 8192 else min(args.repeats, 2) for op in OPS}
    times: dict[str, list[float]] = {op: [] for op in OPS}
    for fn in fns.values():
        fn()  # warm-up
    for r in range(args.repeats):
        for op, fn in fns.items():
            if r < reps[op]:
                times[op].append(timed(fn, args.device)[0])
    return {op: {"ms": statistics.median(t), "min_ms": min(t), "repeats": len(t)} for op, t in times.items()}


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
            timed(op, "cuda")
            return (torch.cuda.max_memory_allocated() - base) / 2**20
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(cpu_peak_child, (name, T, args.dtype, args.chunk_size))


def step_ms(name: str, contexts: list[int], args) -> dict[str, float]:
    """Median ms of one T=1 step continuing from a state built from each context length."""
    runs = {}
    for ctx in contexts:
        q, k, v = inputs(ctx + args.steps, args.device, DTYPES[args.dtype], seed=ctx)
        if name == "chunked":
            q, k = phi(q), phi(k)
            _, state = linear_attention(q[:, :, :ctx], k[:, :, :ctx], v[:, :, :ctx], chunk_size=args.chunk_size)
        else:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            _, state = grouped_attention(q[:, :, :ctx], k[:, :, :ctx], v[:, :, :ctx], **GROUPED)
        runs[ctx] = {"qkv": (q, k, v), "state": state, "ms": []}
    step = {
        "chunked": lambda q, k, v, s: linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], s),
        "grouped": lambda q, k, v, s: grouped_attention(q, k, v, s, **GROUPED),
    }[name]
    for t in range(args.steps):
        for ctx, r in runs.items():
            q, k, v = (x[:, :, ctx + t : ctx + t + 1] for x in r["qkv"])
            ms, (_, r["state"]) = timed(lambda: step(q, k, v, r["state"]), args.device)  # noqa: B023
            r["ms"].append(ms)
    return {str(ctx): statistics.median(r["ms"][10:]) for ctx, r in runs.items()}  # 10 warm-up steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--lengths", default="1024,4096,16384", help="comma-separated sequence lengths")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per op (SDPA: at most 2 from 8K)")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=200, help="decoding steps per context")
    args = p.parse_args()
    lengths, contexts = [int(x) for x in args.lengths.split(",")], [1024, 16384]
    console = Console()
    res = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "B": B,
        "H": H,
        "D": D,
        "chunk_size": args.chunk_size,
        "group_size": GROUP,
        "forward": {},
        "step_ms": {},
    }
    if args.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()

    table = Table(title=f"Full-sequence forward, B={B} H={H} D={D} {args.dtype} on {args.device}")
    for col in ("T", "op", "median ms", "min ms", "peak MB", "speedup vs SDPA"):
        table.add_column(col, justify="right")
    for T in lengths:
        with torch.inference_mode():
            row = forward_ms(T, args)
        gc.collect()
        for op in OPS:
            row[op]["peak_mb"] = peak_mb(op, T, args)
        row["speedup_vs_sdpa"] = {op: row["sdpa"]["ms"] / row[op]["ms"] for op in ("chunked", "grouped")}
        res["forward"][str(T)] = row
        for op in OPS:
            r = row[op]
            speedup = f"{row['speedup_vs_sdpa'][op]:.2f}x" if op != "sdpa" else ""
            table.add_row(str(T), op, f"{r['ms']:.2f}", f"{r['min_ms']:.2f}", f"{r['peak_mb']:.1f}", speedup)
        table.add_section()
        console.print(f"[dim]T={T} done[/dim]")
    console.print(table)

    with torch.inference_mode():
        res["step_ms"] = {op: step_ms(op, contexts, args) for op in ("chunked", "grouped")}
    steps = Table(title=f"Per-token decoding step, median of {args.steps - 10} steps, ms")
    for col in ("context", "linear_attention_step", "grouped_attention T=1"):
        steps.add_column(col, justify="right")
    for ctx in map(str, contexts):
        steps.add_row(ctx, f"{res['step_ms']['chunked'][ctx]:.4f}", f"{res['step_ms']['grouped'][ctx]:.4f}")
    console.print(steps)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
