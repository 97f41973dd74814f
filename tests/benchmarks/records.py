"""Resumable comparison runs: one JSON record per run in a folder (the compare_* scripts)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path


def record_path(out: Path, name: str) -> Path:
    return out / (name.replace("/", "__") + ".json")


def write_record(path: Path, record: dict) -> None:
    """Atomically: an interrupted run leaves no half-written record."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def read_records(out: Path) -> dict[str, dict]:
    return {p.stem.replace("__", "/"): json.loads(p.read_text()) for p in out.glob("*.json")}


def pending(out: Path, only: str | None, runs: Iterable[str]) -> list[tuple[str, Path]]:
    """(name, record path) of each run named by ``--only`` (comma-separated; None: all) that has no
    record in ``out`` yet; unknown names are refused at once."""
    runs = list(runs)
    names = only.split(",") if only else runs
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {', '.join(runs)}")
    return [(name, record_path(out, name)) for name in names if not record_path(out, name).exists()]


def run_pending(
    out: Path, only: str | None, runs: dict, original: Callable[[], dict], run_one: Callable[[str], dict], line: Callable[[dict], str]
) -> None:
    """Run each pending run (``runs``: name -> (what, …)) and record it, the original model's record
    first when it is missing; ``line(record)`` is the progress line printed after each run."""
    todo = pending(out, only, runs)
    orig = record_path(out, "original")
    if not orig.exists():
        write_record(orig, {"name": "original", **original()})
    for name, path in todo:
        print(f"== {name}", flush=True)
        rec = run_one(name)
        rec["what"] = runs[name][0]
        write_record(path, rec)
        print("   " + line(rec), flush=True)


def start(args, report: Callable[[Path], None]):
    """Prepare ``args.out`` and the threads; then print the report and exit under ``--report``, or
    return the default model and its tokenizer (fp32, CPU) to run with."""
    import torch

    from linconv.models import ADAPTERS
    from linconv.sources import load_source

    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.report:
        report(args.out)
        raise SystemExit(0)
    return load_source(None, ADAPTERS)
