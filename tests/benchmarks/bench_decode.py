"""Decode speed against context length: linearized vs original default model, one loop for both
(run by hand; pytest ignores this folder).

Measures, fp32 on CPU (or ``--device cuda``), with the engine of ``linconv.generate``:

1. Decode tokens/s at each context (default 256, 1K, 4K, 16K) for a fresh conversion of the default
   model (SmolLM2-135M-Instruct, default recipe; ``--sinks 0,…`` adds conversions with those attention
   sinks, measured in the same run) and for the original softmax model, all through
   ``linconv.generate`` (eager, or ``--compile``: the same compiled one-token step for both).
   The context is reached by a chunked prefill of random token ids (speed does not depend on the
   text); then ``--warmup`` decode steps are discarded and the median of the next ``--steps`` is taken.
   ``--rounds R`` repeats the whole sweep R times and keeps each figure's best round (every round is
   in the JSON): on a shared machine other work only ever slows a measurement down, and a single
   round can land a busy moment on any one model and context.
   Past the original's trained 8K context its positions extrapolate: the speed is still meaningful.
2. Each figure as a fraction of the memory-bandwidth roofline: one decode step must read every
   weight once plus the decoding state (linear state, or the KV cache at that context), so
   roofline tokens/s = copy bandwidth / (weight bytes + state bytes). The bandwidth is measured here
   with a large tensor copy (bytes read + bytes written per second).
3. linconv's loop vs transformers' ``generate`` (greedy, per-token times from a streamer) at
   ``--hf-context`` tokens, for the same original model and for the linearized one.
4. Peak memory of a ``--prefill-memory``-token chunked prefill of the linearized model, beside the
   weight bytes and the KV cache the original would need at that length. CPU: the peak of live tensor
   bytes (from the profiler's allocation and free records) and the rise of the process's peak RSS,
   reset just before (glibc's mmap threshold is fixed at 1 MiB first so freed chunks are returned;
   RSS still includes allocator slack); CUDA: max_memory_allocated.

The JSON's ``targets`` compares the figures of each linearized model with issue 12's: linearized ÷ original decode tokens/s
>= 0.95 / 1.2 / 2 / 5 at 256 / 1K / 4K / 16K, flatness (16K ÷ 256) >= 0.95, >= 60% of the roofline at
256, a decoding state that is the same size at every context and <= 24 MB.

Prints progress on stderr, rich tables, then one JSON object as the last line. Run:

    python tests/benchmarks/bench_decode.py [--contexts 256,1024,4096,16384] [--steps 32]
        [--warmup 4] [--rounds 1] [--prefill-chunk 2048] [--prefill-memory 32768] [--hf-context 256]
        [--threads N] [--device cpu|cuda] [--compile] [--no-original] [--sinks 0,64]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers.generation.streamers import BaseStreamer

import linconv
from linconv.errors import LinconvError
from linconv.generate import generate
from linconv.models import ADAPTERS
from linconv.sources import load_source

out, err = Console(), Console(stderr=True)
RATIO_TARGETS = {256: 0.95, 1024: 1.2, 4096: 2.0, 16384: 5.0}  # linearized ÷ original decode tokens/s (issue 12)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mib: int = 512, repeats: int = 10) -> float:
    """Bytes per second of a large tensor copy, counting the read and the write (best of repeats).

    Measured at the start and again at the end of the run (the best is kept): on a shared machine a
    single measurement can land in a busy moment and make the roofline look lower than it is.
    """
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers, tied tensors counted once."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def random_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def measure(model, n: int, args, label: str) -> dict:
    """Prefill ``n`` random tokens, decode warmup + steps tokens: the engine's statistics."""
    err.print(f"[dim]{label}: context {n:,}: prefilling in chunks of {args.prefill_chunk}…[/]")
    t = time.perf_counter()
    res = generate(
        model,
        random_prompt(n, model.config.vocab_size),
        max_new_tokens=args.warmup + args.steps + 1,
        stop_token_ids=(),
        prefill_chunk=args.prefill_chunk,
        ignore_context_limit=True,
        compile=args.compile,
    )
    step = statistics.median(res.token_seconds[args.warmup :])
    err.print(
        f"[dim]{label}: context {n:,}: {1 / step:.1f} tok/s decode, prefill "
        f"{res.prefill_tokens_per_s:.0f} tok/s ({time.perf_counter() - t:.0f} s)[/]"
    )
    return {
        "decode_tok_s": 1 / step,
        "ms_per_token": 1e3 * step,
        "prefill_tok_s": res.prefill_tokens_per_s,
        "state_bytes": res.state_bytes_end,
    }


class TimingStreamer(BaseStreamer):
    """Records when transformers' generate hands over each new token (the first put is the prompt)."""

    def __init__(self, device):
        self.times, self.device = [], device

    def put(self, value):
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_decode(model, n: int, args, device) -> float:
    """Median per-token seconds of transformers' greedy generate after ``n`` prompt tokens."""
    ids = torch.tensor([random_prompt(n, model.config.vocab_size)], device=device)
    streamer = TimingStreamer(device)
    total = args.warmup + args.steps + 1
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=total, min_new_tokens=total, do_sample=False, streamer=streamer)
    gaps = [b - a for a, b in zip(streamer.times[1:], streamer.times[2:])]  # one per decode step (times[0]: the prompt)
    return statistics.median(gaps[args.warmup :])


def _hwm_bytes() -> int:
    return 1024 * int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _rss_bytes() -> int:
    return 1024 * int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))


def prefill_memory(model, n: int, args, device) -> dict:
    """Peak memory added by a chunked prefill of ``n`` tokens (prefill and one token, nothing else)."""
    ids = random_prompt(n, model.config.vocab_size, seed=1)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:  # glibc: give big tensors their own mappings, returned on free; hand back freed heap
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (the default threshold grows, and glibc then keeps freed chunks)
            libc.malloc_trim(0)
        except (OSError, AttributeError):
            pass
        base = _rss_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    err.print(f"[dim]linearized: chunked prefill of {n:,} tokens for peak memory…[/]")
    if device.type == "cuda":
        res = generate(model, ids, max_new_tokens=1, stop_token_ids=(), prefill_chunk=args.prefill_chunk)
        tensors = torch.cuda.max_memory_allocated(device) - base
        rss = None
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            res = generate(model, ids, max_new_tokens=1, stop_token_ids=(), prefill_chunk=args.prefill_chunk)
        rss = _hwm_bytes() - base
        # live tensor bytes over time: each op's own allocations (+) and the frees (-), in order
        events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
        tensors = live = 0
        for _, delta in events:
            live += delta
            tensors = max(tensors, live)
    return {
        "tokens": n,
        "peak_tensor_bytes": tensors,
        "peak_rss_above_baseline_bytes": rss,
        "prefill_tok_s": res.prefill_tokens_per_s,
        "state_bytes": res.state_bytes_end,
    }


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="256,1024,4096,16384")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="repeat the sweep; each figure is its best round")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--prefill-memory", type=int, default=32768, help="tokens of the peak-memory prefill (0: skip)")
    p.add_argument("--hf-context", type=int, default=256, help="context of the loop comparison (0: skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-original", action="store_true", help="measure the linearized model only")
    p.add_argument("--sinks", default="", help="comma list: also measure conversions with these attention sinks")
    p.add_argument(
        "--compile", action="store_true", help="decode steps through torch.compile, both models (warm-up steps absorb compiling)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    contexts = sorted(int(c) for c in args.contexts.split(",") if c)
    try:  # checked before the model loads: a bad count is one line, not a traceback minutes later
        extra = {int(s): linconv.LinearizeConfig(sinks=int(s)).validate() for s in args.sinks.split(",") if s}
    except (ValueError, LinconvError) as e:
        raise SystemExit(f"--sinks {args.sinks!r}: {e}") from None

    bandwidth = copy_bandwidth(device)
    err.print(f"[dim]copy bandwidth {bandwidth / 1e9:.1f} GB/s; loading the default model…[/]")
    original, _ = load_source(None, ADAPTERS, dtype=torch.float32, device=device)
    linear = linconv.convert(original)  # fresh conversion, default variant
    weights = weight_bytes(original)
    models = {"linearized": linear}
    for s, config in extra.items():
        models[f"linearized, sinks {s}"] = linconv.convert(original, config)
    if not args.no_original:
        models["original"] = original
    linears = [label for label in models if label != "original"]

    rounds = [{n: {label: measure(model, n, args, label) for label, model in models.items()} for n in contexts} for _ in range(args.rounds)]
    results: dict[int, dict[str, dict]] = {
        n: {
            label: {
                **max((r[n][label] for r in rounds), key=lambda m: m["decode_tok_s"]),
                "rounds_tok_s": [r[n][label]["decode_tok_s"] for r in rounds],
            }
            for label in models
        }
        for n in contexts
    }

    loops = {}
    if args.hf_context:
        n = args.hf_context
        for label, model in models.items():
            ours = results[n][label]["ms_per_token"] / 1e3 if n in results else 1 / measure(model, n, args, label)["decode_tok_s"]
            err.print(f"[dim]{label}: transformers generate at context {n}…[/]")
            theirs = hf_decode(model, n, args, device)
            loops[label] = {"context": n, "linconv_loop_tok_s": 1 / ours, "transformers_generate_tok_s": 1 / theirs}

    memory = prefill_memory(linear, args.prefill_memory, args, device) if args.prefill_memory else None
    bandwidth = max(bandwidth, copy_bandwidth(device))
    for r in (r for by_model in results.values() for r in by_model.values()):
        r["roofline_tok_s"] = bandwidth / (weights + r["state_bytes"])
        r["roofline_fraction"] = r["decode_tok_s"] / r["roofline_tok_s"]

    table = Table(
        title=f"Decode tokens/s against context (fp32, {device.type}, {torch.get_num_threads()} threads, best of {args.rounds} round(s); "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; weights {mb(weights)})"
    )
    for col in ("context", "model", "tok/s", "roofline", "state / KV cache", "÷ original"):
        table.add_column(col, justify="right")
    for n, r in results.items():
        for label, x in r.items():
            ratio = f"{x['decode_tok_s'] / r['original']['decode_tok_s']:.2f}x" if "original" in r else "-"
            table.add_row(f"{n:,}", label, f"{x['decode_tok_s']:.1f}", f"{100 * x['roofline_fraction']:.0f}%", mb(x["state_bytes"]), ratio)
        table.add_section()
    out.print(table)
    if loops:
        lt = Table(title=f"linconv's loop vs transformers generate (greedy, context {args.hf_context})")
        for col in ("model", "linconv loop tok/s", "transformers generate tok/s", "ratio"):
            lt.add_column(col, justify="right")
        for label, r in loops.items():
            lt.add_row(
                label,
                f"{r['linconv_loop_tok_s']:.1f}",
                f"{r['transformers_generate_tok_s']:.1f}",
                f"{r['linconv_loop_tok_s'] / r['transformers_generate_tok_s']:.2f}x",
            )
        out.print(lt)
    if memory:
        kv = (
            results[contexts[0]].get("original", {}).get("state_bytes", 0) / contexts[0] * memory["tokens"]
            if "original" in models
            else None
        )
        rss = memory["peak_rss_above_baseline_bytes"]
        out.print(
            f"chunked prefill of {memory['tokens']:,} tokens (linearized): "
            f"peak tensors +{mb(memory['peak_tensor_bytes'])} above the loaded model "
            f"({memory['peak_tensor_bytes'] / weights:.2f}x the weights' {mb(weights)})"
            + (f", peak RSS +{mb(rss)} ({rss / weights:.2f}x)" if rss is not None else "")
            + f"; state {mb(memory['state_bytes'])}; {memory['prefill_tok_s']:.0f} tok/s (profiled)"
            + (f"; the original's KV cache alone would be ~{mb(kv)}" if kv else "")
        )

    lo, hi = contexts[0], contexts[-1]
    summary = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine distorts every figure
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weights,
        "decode": {str(n): r for n, r in results.items()},
        "linearized_flatness": results[hi]["linearized"]["decode_tok_s"] / results[lo]["linearized"]["decode_tok_s"],
        "linearized_over_original_at_max_context": (
            results[hi]["linearized"]["decode_tok_s"] / results[hi]["original"]["decode_tok_s"] if "original" in models else None
        ),
        "loop_vs_transformers": loops,
        "prefill_memory": memory,
        "compiled": args.compile,
        "targets": targets(results, contexts),
        "targets_other_conversions": {label: targets(results, contexts, label) for label in linears[1:]},
    }
    print(json.dumps(summary))


def targets(results: dict[int, dict[str, dict]], contexts: list[int], label: str = "linearized") -> dict:
    """Each figure of issue 12 for the linearized model ``label`` beside its target: {name: {"value", "target", "met"}}."""
    lin = {n: r[label] for n, r in results.items()}
    check = lambda value, target: {"value": value, "target": target, "met": value >= target}
    out = {}
    for n, target in RATIO_TARGETS.items():
        if n in results and "original" in results[n]:
            out[f"lin_over_orig_{n}"] = check(lin[n]["decode_tok_s"] / results[n]["original"]["decode_tok_s"], target)
    lo, hi = contexts[0], contexts[-1]
    out[f"flatness_{hi}_over_{lo}"] = check(lin[hi]["decode_tok_s"] / lin[lo]["decode_tok_s"], 0.95)
    out[f"roofline_fraction_{lo}"] = check(lin[lo]["roofline_fraction"], 0.60)
    sizes = {r["state_bytes"] for r in lin.values()}
    out["state_bytes"] = {"value": max(sizes), "target": 24e6, "met": len(sizes) == 1 and max(sizes) <= 24e6, "constant": len(sizes) == 1}
    return out


if __name__ == "__main__":
    main()
