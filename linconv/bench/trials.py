"""One max-length trial: run the work at ``n`` tokens under a memory budget and a time limit.

Two runners, both ``trial(n) -> Trial`` for :func:`linconv.bench.maxlen.search_max_length`:

- CPU (:class:`ProcessTrial`): every trial is a fresh child process (``python -m
  linconv.bench.trials SPEC``) that loads the model from a folder; the parent polls its resident
  memory every few milliseconds and kills it as soon as it passes the budget, so the kernel's OOM
  killer never has to decide, and kills it when the work (model loading excluded) passes the per-trial
  time limit. The child reports its own peak RSS at the end, which catches a spike between two polls.
- CUDA (:class:`CudaTrial`): in process; ``torch.OutOfMemoryError`` is caught and the memory freed.
  A ``--memory-budget`` caps the process with ``torch.cuda.set_per_process_memory_fraction``
  (:func:`cuda_budget`); a trial that finishes after the time limit counts as a time failure (CUDA
  work cannot be interrupted).
"""

from __future__ import annotations

import gc
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from linconv.bench.perplexity import window_nll
from linconv.errors import LinconvError
from linconv.generate import generate
from linconv.models import hf as _hf  # noqa: F401  (registers the linconv model types: a trial child loads checkpoints)

OK, MEMORY, TIME = "ok", "memory", "time"  # a trial's outcomes
MODES = ("forward", "generate")
GIB = 1024**3
_MARK = "LINCONV-TRIAL "  # prefix of the child's event lines on stdout


@dataclass
class Trial:
    length: int
    outcome: str  # "ok", "memory" or "time"
    seconds: float = 0.0  # work time, excluding process start and model loading
    peak_bytes: int = 0  # CPU: peak RSS of the trial process; CUDA: peak allocated


# --- the work of one trial (shared by the child process and the CUDA runner) ----------------------


def trial_ids(n: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """A fixed pseudo-random sequence of ``n`` token ids (content does not change memory or time)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=g)


def run_work(model: nn.Module, mode: str, n: int, *, new_tokens: int = 8, prefill_chunk: int = 2048) -> None:
    """One trial's work at length ``n`` (``generate``: n − new_tokens prompt tokens + new_tokens)."""
    device = next(model.parameters()).device
    if mode == "forward":
        window_nll(model, trial_ids(n, model.config.vocab_size)[None].to(device))
    elif mode == "generate":
        prompt = trial_ids(max(1, n - new_tokens), model.config.vocab_size)
        generate(
            model, prompt.tolist(), max_new_tokens=new_tokens, stop_token_ids=(), prefill_chunk=prefill_chunk, ignore_context_limit=True
        )
    else:
        raise LinconvError(f"unknown max-length mode {mode!r}; choose from {', '.join(MODES)}")


# --- CPU: one child process per trial -------------------------------------------------------------


def process_rss(pid: int) -> int:
    """Resident memory of a process in bytes (Linux /proc, else psutil); 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return 0  # a Linux process that has gone
    except OSError:
        return 0
    try:
        import psutil
    except ImportError:
        raise LinconvError("watching a trial's memory needs Linux /proc or the psutil package (pip install psutil)") from None
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _peak_self() -> int:
    """This process's peak RSS in bytes. Linux: VmHWM, the high-water mark of this address space only;
    ``ru_maxrss`` would not do, since it carries the parent's peak across fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class ProcessTrial:
    """``trial(n)`` on CPU: run the work in a fresh child process under a memory budget and time limit.

    The model is loaded in the child from ``model_dir`` (a Hugging Face or linconv folder); loading
    is not timed. Raises LinconvError when loading the model alone passes the budget, when the child
    fails for another reason (its last stderr line is quoted), or when it does not start in time.
    """

    def __init__(
        self,
        model_dir: str | Path,
        mode: str,
        *,
        budget_bytes: int,
        timeout_s: float,
        dtype: str = "float32",
        new_tokens: int = 8,
        prefill_chunk: int = 2048,
        threads: int | None = None,
        poll_s: float = 0.01,
        startup_timeout_s: float = 600.0,
    ):
        if mode not in MODES:
            raise LinconvError(f"unknown max-length mode {mode!r}; choose from {', '.join(MODES)}")
        self.spec = {
            "model": str(model_dir),
            "mode": mode,
            "dtype": dtype,
            "new_tokens": new_tokens,
            "prefill_chunk": prefill_chunk,
            "threads": threads or torch.get_num_threads(),
        }
        self.budget, self.timeout, self.poll, self.startup_timeout = budget_bytes, timeout_s, poll_s, startup_timeout_s
        self.loaded_bytes: int | None = None  # RSS of the first child once its model was loaded

    def __call__(self, n: int) -> Trial:
        cmd = [sys.executable, "-m", "linconv.bench.trials", json.dumps({**self.spec, "length": n})]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        with tempfile.TemporaryFile(mode="w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, env=env)
            try:
                return self._watch(proc, n, err)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()

    def _watch(self, proc: subprocess.Popen, n: int, err) -> Trial:
        events: queue.Queue = queue.Queue()

        def read() -> None:
            for line in proc.stdout:
                if line.startswith(_MARK):
                    events.put(json.loads(line[len(_MARK) :]))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        started, loaded_at, peak, killed, done = time.monotonic(), None, 0, None, None
        while True:
            exited = proc.poll() is not None
            while not events.empty():
                event = events.get()
                if event["event"] == "loaded":
                    loaded_at = time.monotonic()
                    if self.loaded_bytes is None:
                        self.loaded_bytes = event["rss"]
                elif event["event"] == "done":
                    done = event
            if exited:
                break
            rss = process_rss(proc.pid)
            peak = max(peak, rss)
            now = time.monotonic()
            if rss > self.budget:
                killed = MEMORY
            elif loaded_at is not None and now - loaded_at > self.timeout:
                killed = TIME
            elif loaded_at is None and now - started > self.startup_timeout:
                proc.kill()
                raise LinconvError(f"a max-length trial process did not load the model within {self.startup_timeout:.0f} s")
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(self.poll)
        reader.join(timeout=5)
        while not events.empty():  # lines that arrived between the last poll and exit
            event = events.get()
            if event["event"] == "done":
                done = event
            elif event["event"] == "loaded" and loaded_at is None:
                loaded_at = time.monotonic()
                self.loaded_bytes = self.loaded_bytes or event["rss"]
        seconds = time.monotonic() - loaded_at if loaded_at is not None else 0.0
        if killed == MEMORY and loaded_at is None:
            gib = self.budget / GIB
            raise LinconvError(
                f"--memory-budget {gib:.2f} GiB is smaller than the model: the process passed it while loading the model, before any work"
            )
        if killed:
            return Trial(n, killed, seconds, peak)
        if done is None:
            if proc.returncode in (-9, 137):  # killed by someone else: most likely the kernel's OOM killer
                return Trial(n, MEMORY, seconds, peak)
            err.seek(0)
            lines = [ln.strip() for ln in err.read().splitlines() if ln.strip()]
            raise LinconvError(f"a max-length trial at {n} tokens failed: {lines[-1] if lines else f'exit code {proc.returncode}'}")
        peak = max(peak, done["peak"])
        outcome = MEMORY if peak > self.budget else TIME if done["seconds"] > self.timeout else OK
        return Trial(n, outcome, done["seconds"], peak)


def _emit(**event) -> None:
    print(_MARK + json.dumps(event), flush=True)


def child_main(spec: dict) -> None:
    """The child process of :class:`ProcessTrial`: load, report, work, report."""
    parent = os.getppid()

    def orphaned() -> None:  # the parent was killed without killing us: stop rather than run on
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=orphaned, daemon=True).start()
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"])).eval()
    with torch.inference_mode():
        for p in model.parameters():  # fault every weight page in: loading is done before timing
            p.sum()
    _emit(event="loaded", rss=process_rss(os.getpid()))
    t0 = time.perf_counter()
    with torch.inference_mode():
        run_work(model, spec["mode"], spec["length"], new_tokens=spec["new_tokens"], prefill_chunk=spec["prefill_chunk"])
    _emit(event="done", seconds=time.perf_counter() - t0, peak=_peak_self())


# --- CUDA: in process -----------------------------------------------------------------------------


class CudaTrial:
    """``trial(n)`` on CUDA: catch ``torch.OutOfMemoryError``, free, report."""

    def __init__(self, model: nn.Module, mode: str, *, timeout_s: float, new_tokens: int = 8, prefill_chunk: int = 2048):
        self.model, self.mode, self.timeout = model, mode, timeout_s
        self.new_tokens, self.prefill_chunk = new_tokens, prefill_chunk
        self.device = next(model.parameters()).device
        self.loaded_bytes = torch.cuda.memory_allocated(self.device)

    def __call__(self, n: int) -> Trial:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        oom = False
        try:
            with torch.inference_mode():
                run_work(self.model, self.mode, n, new_tokens=self.new_tokens, prefill_chunk=self.prefill_chunk)
            torch.cuda.synchronize(self.device)
        except torch.OutOfMemoryError:
            oom = True  # free outside the handler: the traceback still holds the trial's tensors
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device)
        gc.collect()
        torch.cuda.empty_cache()
        outcome = MEMORY if oom else TIME if seconds > self.timeout else OK
        return Trial(n, outcome, seconds, peak)


def cuda_budget(device: torch.device, budget_bytes: int | None) -> None:
    """Cap this process's CUDA memory at ``budget_bytes`` (None: the whole device)."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if budget_bytes is None else min(1.0, budget_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)


if __name__ == "__main__":
    child_main(json.loads(sys.argv[1]))
