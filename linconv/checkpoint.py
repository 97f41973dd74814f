"""Linearized checkpoints: a standard Hugging Face folder, written atomically, loaded without pickle.

Folder: config.json (base config + ``linconv`` section), model.safetensors (sharded when large),
tokenizer files, generation_config.json, and ``linconv.json`` + README.md saying how it was made.
A write goes to a hidden temporary folder beside the target and is renamed into place only when
complete, so a crash or Ctrl-C never leaves a folder that looks finished.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from linconv.errors import LinconvError, first_line
from linconv.models.hf import is_linconv
from linconv.version import __version__

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so stale temporaries are left alone there
    fcntl = None

TMP_TAG = ".tmp-"  # a temporary folder of ours: ``.{name}.tmp-XXXX`` beside the target ``name``
_STALE_AFTER_S = 60.0  # a temporary folder this old and not locked is a killed save's leftover


def check_output(path: str | Path, *, overwrite: bool = False, folder: bool = True, inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """Refuse, with one line and before any work is done, an output that cannot be written.

    ``folder``: the output is a folder (a checkpoint: an existing one needs ``overwrite``); else a
    file (--json, --plot: replaced freely, but never a folder). Catches a path under a file, a broken
    symbolic link, and a location that cannot be written (permissions, read-only file system) by
    creating and removing a probe file where the output will go. ``inputs``: paths the output must
    neither replace nor sit inside (even with ``overwrite``, an input is never touched).
    """
    path = Path(path).expanduser()
    for given in inputs:
        if given is not None and Path(given).exists():
            where, out = Path(given).resolve(), path.resolve()
            if out == where or where in out.parents or out in where.parents:
                raise LinconvError(f"the output {path} overlaps the input {given}; write to another folder")
    if path.is_symlink() and not path.exists():
        raise LinconvError(f"{path} is a broken symbolic link (to {os.readlink(path)}); remove it or write elsewhere")
    if path.exists():
        if folder and not overwrite:
            raise LinconvError(f"{path} already exists; pass --overwrite to replace it")
        if not folder and path.is_dir():
            raise LinconvError(f"{path} is a folder; give a file name")
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        what = "a broken symbolic link" if parent.is_symlink() and not parent.exists() else "not a folder"
        raise LinconvError(f"cannot write {path}: {parent} is {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LinconvError(f"cannot write {path}: {parent}: {e.strerror or e}") from None
    return path


def _remove(path: Path) -> None:
    """Delete a file, a symbolic link or a folder tree; nothing if it is not there."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _lock(folder: Path):
    """An exclusive lock on ``folder`` held while a save writes it (released by the kernel even on
    SIGKILL), or None where locks are unavailable. Raises BlockingIOError if another process holds it."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def clean_stale_temporaries(output: Path) -> list[Path]:
    """Remove the temporary folders that killed saves of ``output`` left beside it: ours by name,
    older than a minute and not locked by a live save. Returns what was removed."""
    removed: list[Path] = []
    if fcntl is None:
        return removed
    now = time.time()
    for tmp in output.parent.glob(f".{glob.escape(output.name)}{TMP_TAG}*"):
        try:
            if now - tmp.lstat().st_mtime < _STALE_AFTER_S:
                continue
            if not tmp.is_dir() or tmp.is_symlink():  # a file or link left by a killed --overwrite
                _remove(tmp)
                removed.append(tmp)
                continue
            fd = _lock(tmp)
        except OSError:
            continue  # a live save holds it (or it vanished meanwhile)
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        finally:
            os.close(fd)
    return removed


@contextmanager
def atomic_folder(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``output`` when the block finishes without error.

    The temporary folder is locked while it is written, so that the next save of the same output
    can tell a killed save's leftover from a live one and remove it (see :func:`clean_stale_temporaries`).
    """
    output = check_output(output, overwrite=overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}{TMP_TAG}", dir=output.parent))
    fd = _lock(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any folder
    try:
        yield tmp
        if output.exists() or output.is_symlink():
            old = output.with_name(f".{output.name}{TMP_TAG}old")
            _remove(old)
            output.rename(old)
            tmp.rename(output)
            _remove(old)
        else:
            tmp.rename(output)
    finally:
        if fd is not None:
            os.close(fd)
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
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from linconv.sources import check_safetensors  # sources imports this module

    path = Path(path)
    if not path.is_dir():
        raise LinconvError(f"checkpoint folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise LinconvError(f"{path} has no config.json: not a model folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, StrictDataclassError) as e:
        raise LinconvError(f"cannot read {path / 'config.json'}: {first_line(e)}") from None
    if not is_linconv(config):
        raise LinconvError(f"{path} is a {config.model_type!r} model, not a linconv checkpoint; convert it first with `linconv convert`")
    check_safetensors(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", use_safetensors=True)
    except Exception as e:  # safetensors and transformers raise many types for damaged files
        raise LinconvError(f"cannot load the weights in {path}: {first_line(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        tokenizer = None
    return model.to(device).eval(), tokenizer
