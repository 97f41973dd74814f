"""Linearized checkpoints: a standard Hugging Face folder, written atomically, loaded without pickle.

Folder: config.json (base config + ``linconv`` section), model.safetensors (sharded when large),
tokenizer files, generation_config.json, and ``linconv.json`` + README.md saying how it was made.
A write goes to a hidden temporary folder beside the target and is renamed into place only when
complete, so a crash or Ctrl-C never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from linconv.errors import LinconvError, first_line
from linconv.models.hf import is_linconv
from linconv.version import __version__


@contextmanager
def atomic_folder(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``output`` when the block finishes without error."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise LinconvError(f"{output} already exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any folder
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def made_by(command: str) -> dict:
    """The fields every card starts with: which linconv and which command made the folder, and when."""
    return {"made_by": f"linconv {__version__} {command}", "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def linconv_config(folder: str | Path) -> dict | None:
    """``folder``'s config.json as a dict if it is a linconv checkpoint, else None (no or unreadable
    config.json, another model type). Reads no weights, so it is a cheap test before a load."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and is_linconv(config) else None


def save_checkpoint(
    model, tokenizer, output: str | Path, *, card: dict, overwrite: bool = False, extra: Callable[[Path], None] | None = None
) -> Path:
    """Write ``model`` and ``tokenizer`` as a linconv folder; ``card`` records how it was made.

    ``extra(folder)`` may add files (an adapter, Medusa heads) inside the same atomic write.
    """
    with atomic_folder(output, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        (tmp / "linconv.json").write_text(json.dumps(card, indent=2) + "\n")
        lines = [f"# {Path(output).name}", "", "A linearized model made by linconv.", ""]
        lines += [f"- **{k}**: `{v}`" for k, v in card.items()]
        (tmp / "README.md").write_text("\n".join(lines) + "\n")
    return Path(output)


def load(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a linconv checkpoint folder: returns ``(model, tokenizer)`` (tokenizer None if absent)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise LinconvError(f"checkpoint folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise LinconvError(f"{path} has no config.json: not a model folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise LinconvError(f"cannot read {path / 'config.json'}: {first_line(e)}") from None
    if not is_linconv(config):
        raise LinconvError(f"{path} is a {config.model_type!r} model, not a linconv checkpoint; convert it first with `linconv convert`")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", use_safetensors=True)
    except Exception as e:  # safetensors and transformers raise many types for damaged files
        raise LinconvError(f"cannot load the weights in {path}: {first_line(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        tokenizer = None
    return model.to(device).eval(), tokenizer
