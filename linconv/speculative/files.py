"""Draft files beside a checkpoint: ``<name>.safetensors`` (weights) + ``<name>.json`` (config).

Both Medusa heads and the EAGLE head live in the checkpoint folder they were trained for. The
weights are written first and the json last, each through a temporary file renamed into place, so
a folder whose json exists always has complete weights. The json may carry the measured tree shape
(``"tree"``: widths per depth and the figures behind them), which ``store_tree`` updates in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from linconv.errors import LinconvError, first_line


def _replace(folder: Path, name: str, write) -> None:
    tmp = folder / f".{name}.tmp"
    write(tmp)
    os.replace(tmp, folder / name)


def write_draft(folder: str | Path, weights: str, tensors: dict[str, Tensor], config_name: str, config: dict) -> Path:
    """Write ``tensors`` to ``folder/weights``, then ``config`` to ``folder/config_name``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LinconvError(f"cannot save the draft: {folder} is not a folder")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _replace(folder, weights, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _replace(folder, config_name, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return folder / weights


def read_config(folder: str | Path, config_name: str, missing: str, newest_format: int | None = None) -> dict:
    """The draft's json as a dict; a one-line LinconvError "FOLDER has no ``missing``" when it is not
    there, and one when its ``format_version`` is newer than ``newest_format``."""
    path = Path(folder) / config_name
    if not path.is_file():
        raise LinconvError(f"{folder} has no {missing}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LinconvError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(config, dict):
        raise LinconvError(f"{path} is not a json object")
    if newest_format is not None and config.get("format_version", 1) > newest_format:
        raise LinconvError(f"{path} has format {config['format_version']}, newer than this linconv ({newest_format}); upgrade linconv")
    return config


def read_weights(folder: str | Path, weights: str) -> dict[str, Tensor]:
    try:
        return load_file(str(Path(folder) / weights))
    except (OSError, SafetensorError) as e:
        raise LinconvError(f"cannot load {Path(folder) / weights}: {first_line(e)}") from None


def store_tree(folder: str | Path, config_name: str, tree: dict) -> None:
    """Record a measured tree shape (``TreeShape.to_dict()``) in the draft's json."""
    config = read_config(folder, config_name, config_name)
    config["tree"] = tree
    _replace(Path(folder), config_name, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def stored_widths(folder: str | Path | None, config_name: str) -> list[int] | None:
    """The tree widths stored with a draft, or None when there are none (no folder, no measurement)."""
    if folder is None or not (Path(folder) / config_name).is_file():
        return None
    widths = read_config(folder, config_name, config_name).get("tree", {}).get("widths")
    return [int(w) for w in widths] if widths else None
