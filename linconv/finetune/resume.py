"""The resume state of an interrupted run: ``OUTPUT.partial/``, written atomically, never unpickled.

Files: ``progress.json`` (the :class:`ResumeState`: stage, step, settings, losses, evaluations),
``trainable.safetensors`` (every tensor trained so far, all stages), and — when the state was saved
inside a stage — the optimizer, scheduler and grad-scaler states as ``optimizer.safetensors``
(their tensors) plus ``optimizer.json`` (everything else, with the tensors' names in their places).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from safetensors.torch import load_file, save_file
from torch import Tensor

from linconv.checkpoint import atomic_folder
from linconv.errors import LinconvError, first_line
from linconv.finetune.config import FinetuneConfig

PROGRESS, TRAINABLE = "progress.json", "trainable.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_REST = "optimizer.safetensors", "optimizer.json"


def resume_folder(output: str | Path) -> Path:
    """Where a run writing ``output`` keeps its resume state: ``OUTPUT.partial`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


@dataclass
class ResumeState:
    """Where an interrupted run stopped, and what it must agree with to continue."""

    stage: str  # the stage being trained (or just finished) ...
    step: int  # ... and its optimizer steps done
    config: dict  # FinetuneConfig.fingerprint(): the run's settings
    world_size: int  # processes
    checkpoint: str  # the input checkpoint
    losses: dict[str, list[float]]  # every stage's losses so far
    evals: list[dict]  # the held-out evaluations so far

    @classmethod
    def load(cls, folder: Path) -> ResumeState:
        """The state in ``folder``; a missing, truncated or garbled file is a one-line LinconvError."""
        try:
            data = json.loads((folder / PROGRESS).read_text())
        except (OSError, ValueError) as e:
            raise LinconvError(f"cannot read the resume state {folder / PROGRESS}: {first_line(e)}; start over with --overwrite") from None
        data = data if isinstance(data, dict) else {}
        hints = get_type_hints(cls)
        wrong = [f.name for f in fields(cls) if not isinstance(data.get(f.name), get_origin(hints[f.name]) or hints[f.name])]
        if wrong:
            raise LinconvError(
                f"the resume state {folder / PROGRESS} is damaged (bad or missing {', '.join(wrong)}); start over with --overwrite"
            )
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def check(self, folder: Path, config: dict, world_size: int, checkpoint: Path, stages: dict[str, int]) -> None:
        """Refuse a resume that would not continue the same run (``stages``: name -> steps of this run)."""
        defaults = FinetuneConfig().fingerprint()  # a state saved before an option existed ran with its default
        diff = [k for k in config if self.config.get(k, defaults.get(k)) != config[k]]
        if diff:
            listed = ", ".join(f"--{k.replace('_', '-')} {self.config.get(k)!r} (now {config[k]!r})" for k in diff)
            raise LinconvError(f"{folder} was made with other settings: {listed}; resume with the same settings")
        if self.world_size != world_size:
            raise LinconvError(
                f"{folder} was made with {self.world_size} processes, this run has {world_size}; resume with the same number"
            )
        if Path(self.checkpoint).resolve() != checkpoint.resolve():
            raise LinconvError(f"{folder} continues a fine-tune of {self.checkpoint}, not of {checkpoint}; resume with the same CHECKPOINT")
        if self.stage not in stages:
            raise LinconvError(f"{folder} stopped in stage {self.stage!r}, which this run does not have ({', '.join(stages)})")
        total = stages[self.stage]
        if not 0 <= self.step <= total:
            raise LinconvError(f"{folder} stopped at step {self.step} of {self.stage}, which has {total} steps")
        needed = [TRAINABLE, *((OPTIMIZER_TENSORS, OPTIMIZER_REST) if 0 < self.step < total else ())]  # inside a stage: its optimizer
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise LinconvError(f"the resume state in {folder} lacks {', '.join(missing)}; start over with --overwrite")

    def save(self, folder: Path, tensors: dict[str, Tensor], optimizer: dict[str, Any] | None) -> None:
        """Write this state, the trained ``tensors`` and (inside a stage) the ``optimizer`` states, atomically."""
        with atomic_folder(folder, overwrite=True) as tmp:
            save_file({n: t.detach().to("cpu").clone() for n, t in tensors.items()}, str(tmp / TRAINABLE))
            if optimizer is not None:
                arrays: dict[str, Tensor] = {}
                rest = _pack(optimizer, "", arrays)
                save_file(arrays, str(tmp / OPTIMIZER_TENSORS))
                (tmp / OPTIMIZER_REST).write_text(json.dumps(rest) + "\n")
            (tmp / PROGRESS).write_text(json.dumps(asdict(self), indent=1) + "\n")


def load_tensors(folder: Path) -> dict[str, Tensor]:
    """The trained tensors of the resume state in ``folder``."""
    try:
        return load_file(str(folder / TRAINABLE))
    except Exception as e:
        raise LinconvError(f"cannot read the resume state in {folder}: {first_line(e)}") from None


def load_optimizer(folder: Path) -> dict[str, Any]:
    """The optimizer, scheduler and scaler states saved by :meth:`ResumeState.save` (tensors on the CPU)."""
    try:
        arrays = load_file(str(folder / OPTIMIZER_TENSORS))
        return _unpack(json.loads((folder / OPTIMIZER_REST).read_text()), arrays)
    except Exception as e:
        raise LinconvError(
            f"cannot read the optimizer state of the resume state in {folder}: {first_line(e)}; start over with --overwrite"
        ) from None


def _pack(value: Any, key: str, arrays: dict[str, Tensor]) -> Any:
    """``value`` as JSON: tensors moved into ``arrays`` (named by their path); dict keys and tuples kept."""
    if isinstance(value, Tensor):
        arrays[key] = value.detach().to("cpu").contiguous()
        return {"tensor": key}
    if isinstance(value, dict):  # pairs, so that integer keys (an optimizer's parameter ids) stay integers
        return {"dict": [[k, _pack(v, f"{key}.{k}", arrays)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_pack(v, f"{key}.{i}", arrays) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_pack(v, f"{key}.{i}", arrays) for i, v in enumerate(value)]
    return value


def _unpack(value: Any, arrays: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_unpack(v, arrays) for v in value]
    if isinstance(value, dict):
        (kind, inner), *_ = value.items()
        if kind == "tensor":
            return arrays[inner]
        if kind == "tuple":
            return tuple(_unpack(v, arrays) for v in inner)
        return {k: _unpack(v, arrays) for k, v in inner}
    return value
