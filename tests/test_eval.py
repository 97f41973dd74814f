"""The field's evaluations in ``linconv bench``: the offline next-line task and its scorer (against a
plain full-logits computation and against lm-evaluation-harness when installed), perplexity by
position (chunked prefill == one full forward; bucket arithmetic), passkey prompts and scoring, the
JSON schemas of the new keys, and the CLI end to end on tiny models."""

import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import converted, save_tiny, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

import linconv
from linconv.bench import downstream as downstream_mod
from linconv.bench import passkey as passkey_mod
from linconv.bench.downstream import SCHEMA as DOWNSTREAM_SCHEMA
from linconv.bench.downstream import DownstreamSettings, downstream, downstream_json
from linconv.bench.longppl import SCHEMA as LONGPPL_SCHEMA
from linconv.bench.longppl import LongPplSettings, bucket_edges, bucket_means, long_perplexity, long_perplexity_json, position_nll
from linconv.bench.nextline import choice_loglikelihoods, encode_pair, next_line_items, score_items, write_lm_eval_task
from linconv.bench.passkey import (
    FILLER,
    INTRO,
    NEEDLE,
    QUESTION,
    PasskeySettings,
    parse_depths,
    parse_lengths,
    passkey,
    passkey_correct,
    passkey_json,
    passkey_prompt,
)
from linconv.bench.passkey import SCHEMA as PASSKEY_SCHEMA
from linconv.checkpoint import save_checkpoint
from linconv.cli import app
from linconv.data import builtin_text
from linconv.errors import LinconvError

runner = CliRunner()

# A play-like text whose every line is distinct: "next line" has one right answer and many distractors.
PLAY = "\n".join(f"Speaker {i % 7}.\nThe line number {i} is spoken here, slowly and clearly, by speaker {i % 7}." for i in range(600))


def conforms(value, schema, where="$"):
    """A minimal JSON Schema check (type, enum, required, properties, additionalProperties, items)."""
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds or []
    python = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "null": type(None)}
    assert not kinds or any(isinstance(value, python[k]) and not (k != "null" and isinstance(value, bool)) for k in kinds), (where, value)
    if "enum" in schema:
        assert value in schema["enum"], (where, value)
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, (where, key)
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        assert extra is not None or set(value) <= set(props), (where, sorted(set(value) - set(props)))
        for key, v in value.items():
            conforms(v, props.get(key, extra or {}), f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            conforms(v, schema["items"], f"{where}[{i}]")


def long_tiny(arch="llama", seed=0):
    """A tiny model whose trained context (1024) holds every prompt of these tests."""
    return tiny_model(arch, seed, max_position_embeddings=1024)


# --- next_line: the offline multiple-choice task ----------------------------------------------------


def test_next_line_items_hold_the_true_next_line_and_length_matched_distractors():
    items = next_line_items(PLAY, 40, seed=3)
    assert len(items) == 40 and items == next_line_items(PLAY, 40, seed=3)
    lines = PLAY.splitlines()
    for it in items:
        true = it.choices[it.label]
        i = lines.index(true)
        assert it.context == "\n".join(lines[max(0, i - 6) : i]) and not it.context.endswith("\n")
        assert len(set(it.choices)) == 4
        for other in it.choices:
            assert 0.75 * len(true) <= len(other) <= 1.25 * len(true)
            assert abs(lines.index(other) - i) >= 200 or other == true
    assert len({it.label for it in items}) > 1  # the answer is not always in the same place
    with pytest.raises(LinconvError, match="too few"):
        next_line_items(PLAY, 5000)


def test_next_line_items_on_the_builtin_plays():
    items = next_line_items(builtin_text("heldout"), 50)
    assert len(items) == 50 and all(it.choices[it.label] in builtin_text("heldout") for it in items)


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    tok = tiny_tokenizer()
    head, cont = encode_pair(tok, "the quick brown ", "fox")
    assert head == tok.encode("the quick brown") and head + cont == tok.encode("the quick brown fox")


def reference_loglikelihoods(model, tok, item):
    """One unpadded full forward per choice, full-vocabulary log-softmax, sum over the choice's tokens."""
    out = []
    for choice in item.choices:
        head = tok.encode(item.context)
        whole = tok.encode(item.context + "\n" + choice)
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        out.append(sum(logp[p - 1, whole[p]].item() for p in range(len(head), len(whole))))
    return out


@pytest.mark.parametrize("which", ["original", "linearized"])
def test_choice_loglikelihoods_equal_one_forward_per_choice(which):
    model = long_tiny() if which == "original" else converted("llama")
    tok = tiny_tokenizer()
    for item in next_line_items(PLAY, 3, context_lines=2):
        assert choice_loglikelihoods(model, tok, item) == pytest.approx(reference_loglikelihoods(model, tok, item), abs=1e-3)


def test_score_items_counts_the_argmax_choice():
    model, tok = long_tiny(), tiny_tokenizer()
    items = next_line_items(PLAY, 12, context_lines=2)
    lls = [reference_loglikelihoods(model, tok, it) for it in items]
    want = sum(max(range(4), key=ll.__getitem__) == it.label for ll, it in zip(lls, items)) / 12
    want_norm = sum(max(range(4), key=lambda c: ll[c] / len(it.choices[c])) == it.label for ll, it in zip(lls, items)) / 12
    got = score_items(model, tok, items)
    assert (got.acc, got.acc_norm, got.items) == (pytest.approx(want), pytest.approx(want_norm), 12)


def test_write_lm_eval_task(tmp_path):
    items = next_line_items(PLAY, 3)
    folder = write_lm_eval_task(items, tmp_path / "t")
    rows = [json.loads(line) for line in (folder / "next_line.jsonl").read_text().splitlines()]
    assert rows[1] == {"context": items[1].context, "choices": list(items[1].choices), "label": items[1].label}
    config = json.loads((folder / "next_line.yaml").read_text())
    assert config["task"] == "next_line" and config["dataset_kwargs"]["data_files"]["test"] == str(folder / "next_line.jsonl")


# --- downstream ---------------------------------------------------------------------------------------


@pytest.fixture
def pair():
    tok = tiny_tokenizer()
    linearized = converted("llama")
    linearized.config.max_position_embeddings = 1024  # the harness truncates prompts to it; RoPE itself has no limit
    return {"original": (long_tiny(), tok), "linearized": (linearized, tok)}


def test_downstream_without_the_harness(pair, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    result = downstream(pair, DownstreamSettings(tasks=("next_line",), limit=6))
    (task,) = result.tasks
    assert (task.task, task.runner, task.items) == ("next_line", "linconv", 6)
    items = next_line_items(builtin_text("heldout"), 6)
    assert task.acc["original"] == score_items(*pair["original"], items).acc
    conforms(downstream_json(result), DOWNSTREAM_SCHEMA)
    with pytest.raises(LinconvError, match=r"piqa need lm-evaluation-harness: pip install 'linconv\[eval\]'"):
        downstream(pair, DownstreamSettings(tasks=("next_line", "piqa"), limit=6))


def test_downstream_through_the_harness_matches_linconvs_scorer(pair, tmp_path):
    pytest.importorskip("lm_eval")
    # a task of the user's whose dataset is on the Hub, which tests never reach: skipped with a reason
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "hub_task.yaml").write_text(
        json.dumps({"task": "hub_task", "dataset_path": "nobody/nothing", "output_type": "multiple_choice", "test_split": "test"})
    )
    settings = DownstreamSettings(tasks=("next_line", "hub_task"), limit=8, include=str(tmp_path / "mine"))
    result = downstream(pair, settings)
    (task,) = result.tasks
    assert (task.task, task.runner, task.items) == ("next_line", "lm-eval", 8)
    items = next_line_items(builtin_text("heldout"), 8)
    for role, (model, tok) in pair.items():
        mine = score_items(model, tok, items)
        assert (task.acc[role], task.acc_norm[role]) == (pytest.approx(mine.acc), pytest.approx(mine.acc_norm))
    assert list(result.unavailable) == ["hub_task"] and result.unavailable["hub_task"]
    conforms(downstream_json(result), DOWNSTREAM_SCHEMA)


def test_downstream_refuses_a_bad_limit(pair):
    with pytest.raises(LinconvError, match="--eval-limit"):
        downstream(pair, DownstreamSettings(tasks=("next_line",), limit=0))


# --- longppl: NLL by position ----------------------------------------------------------------------------


def test_bucket_edges_double_and_stop_at_the_end():
    assert bucket_edges(5000) == [(0, 1024), (1024, 2048), (2048, 4096), (4096, 5000)]
    assert bucket_edges(4096) == [(0, 1024), (1024, 2048), (2048, 4096)]
    assert bucket_edges(700) == [(0, 700)]
    assert bucket_edges(40, first=8) == [(0, 8), (8, 16), (16, 32), (32, 40)]
    assert bucket_edges(40, first=8, per_octave=2) == [(0, 8), (8, 11), (11, 16), (16, 23), (23, 32), (32, 40)]
    with pytest.raises(LinconvError):
        bucket_edges(1)


def test_bucket_means_skip_position_zero():
    nll = torch.arange(40, dtype=torch.float32)  # nll[p] = p
    assert bucket_means(nll, bucket_edges(40, first=8)) == [4.0, 11.5, 23.5, 35.5]  # (1..7), (8..15), (16..31), (32..39)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("which", ["original", "linearized"])
def test_chunked_position_nll_equals_one_full_forward(arch, which):
    model = tiny_model(arch) if which == "original" else converted(arch)
    ids = torch.randint(4, 96, (100,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = F.cross_entropy(model(ids[None]).logits[0, :-1].float(), ids[1:], reduction="none")
    for chunk in (7, 32, 200):
        got = position_nll(model, ids, chunk)
        assert got[0] == 0 and torch.allclose(got[1:], full, atol=1e-4), chunk


def test_long_perplexity_buckets_and_json():
    tok = tiny_tokenizer()
    models = {"original": (tiny_model("llama"), tok), "linearized": (converted("llama"), tok)}
    doc = torch.randint(4, 96, (3000,), generator=torch.Generator().manual_seed(1))
    r = long_perplexity(models, doc, LongPplSettings(tokens=2500, chunk=300))
    assert [(b.start, b.end) for b in r.buckets] == [(0, 1024), (1024, 2048), (2048, 2500)]
    nll = position_nll(models["linearized"][0], doc[:2500], 1000)
    assert r.buckets[2].nll["linearized"] == pytest.approx(nll[2048:].mean().item(), rel=1e-5)
    assert r.trained_context == 128 and r.curve_ends[:4] == [64, 76, 91, 108] and r.curve_ends[-1] == 2500
    data = long_perplexity_json(r)
    conforms(data, LONGPPL_SCHEMA)
    assert data["buckets"][0]["ratio"] == pytest.approx(
        data["buckets"][0]["linearized"]["perplexity"] / data["buckets"][0]["original"]["perplexity"]
    )
    with pytest.raises(LinconvError, match="fewer than --long-tokens"):
        long_perplexity(models, doc, LongPplSettings(tokens=4000))
    gpt2 = {"linearized": (converted("gpt2"), tok)}
    with pytest.raises(LinconvError, match="absolute position embeddings for 128"):
        long_perplexity(gpt2, doc, LongPplSettings(tokens=200))


# --- passkey -------------------------------------------------------------------------------------------


def test_parse_passkey_options():
    assert parse_lengths("4k,512, 1K") == (512, 1024, 4096)
    assert parse_depths("1,0,0.5") == (0.0, 0.5, 1.0)
    for bad in ("", "x", "0", "-1K"):
        with pytest.raises(LinconvError, match="--passkey-lengths"):
            parse_lengths(bad)
    for bad in ("", "a", "1.5", "-0.1"):
        with pytest.raises(LinconvError, match="--passkey-depths"):
            parse_depths(bad)


def test_passkey_correct_takes_the_first_number():
    assert passkey_correct(" 71432.", "71432") and passkey_correct("71432 is it", "71432")
    assert not passkey_correct(" 7143", "71432") and not passkey_correct(" 714321", "71432")
    assert not passkey_correct("12345, no: 71432", "71432") and not passkey_correct(" none", "71432")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_length_and_depth(depth):
    tok = tiny_tokenizer()
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    ids = passkey_prompt(tok, 600, depth, "57213")
    filler = enc(FILLER)
    assert 600 - len(filler) < len(ids) <= 600
    assert ids[: len(enc(INTRO))] == enc(INTRO) and ids[-len(enc(QUESTION)) :] == enc(QUESTION)
    text = tok.decode(ids)
    assert text.replace(" ", "").count("57213") == 2
    before = len(enc(INTRO))
    units = (len(ids) - before - len(enc(QUESTION)) - len(enc(NEEDLE.format(key="57213")))) // len(filler)
    assert ids[before : before + round(depth * units) * len(filler)] == filler * round(depth * units)
    with pytest.raises(LinconvError, match="at least"):
        passkey_prompt(tok, 30, depth, "57213")


def test_passkey_grid_scores_what_each_model_answers(monkeypatch):
    """An oracle that reads the key from its prompt scores 100%, one that always says 12345 scores 0%."""
    tok = tiny_tokenizer()
    oracle, wrong = long_tiny(seed=1), long_tiny(seed=2)
    seen = []

    def fake_generate(model, rows, **kw):
        seen.append([tuple(r) for r in rows])
        keys = [re.findall(r"\d{5}", tok.decode(r).replace(" ", ""))[0] for r in rows]
        texts = [f" {k}." if model is oracle else " 12345." for k in keys]
        return type("R", (), {"texts": texts})()

    monkeypatch.setattr(passkey_mod, "generate", fake_generate)
    settings = PasskeySettings(lengths=(300, 600), depths=(0.0, 1.0), trials=3)
    r = passkey({"original": (oracle, tok), "linearized": (wrong, tok)}, settings)
    assert r.accuracy("original") == [[1.0, 1.0], [1.0, 1.0]] and r.accuracy("linearized") == [[0.0, 0.0], [0.0, 0.0]]
    assert r.overall("original") == 1.0 and seen[:4] == seen[4:]  # both models get the same prompts
    assert [(c.length, c.depth) for c in r.cells] == [(300, 0.0), (300, 1.0), (600, 0.0), (600, 1.0)]
    conforms(passkey_json(r), PASSKEY_SCHEMA)


def test_passkey_runs_the_engine_on_tiny_models():
    tok = tiny_tokenizer()
    models = {"original": (long_tiny(), tok), "linearized": (converted("llama"), tok)}
    r = passkey(models, PasskeySettings(lengths=(300,), depths=(0.5,), trials=2, chunk=64))
    (cell,) = r.cells
    assert set(cell.correct) == {"original", "linearized"} and all(0 <= v <= 2 for v in cell.correct.values())
    assert all(len(a) == 2 for a in cell.answers.values())


# --- bench CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalbench")
    save_tiny("llama", root / "base", max_position_embeddings=1024)
    model = linconv.convert(str(root / "base"), linconv.LinearizeConfig(source=str(root / "base"), group_size=8, conv_kernel=3))
    save_checkpoint(model, tiny_tokenizer(), root / "ckpt", card={})
    (root / "text.txt").write_text(" ".join(["the quick brown fox jumps over the lazy dog."] * 200))
    return root


def test_bench_evaluations_end_to_end(ckpt, tmp_path):
    out, png = tmp_path / "e.json", tmp_path / "e.png"
    args = ["bench", str(ckpt / "ckpt"), "--text", str(ckpt / "text.txt"), "--threads", "1", "--device", "cpu", "--ppl-window", "32"]
    res = runner.invoke(
        app,
        [
            *args,
            "--tasks",
            "downstream,longppl,passkey",
            "--eval-tasks",
            "next_line",
            "--eval-limit",
            "6",
            "--long-tokens",
            "1500",
            "--prefill-chunk",
            "256",
            "--passkey-lengths",
            "300",
            "--passkey-depths",
            "0,1",
            "--passkey-trials",
            "1",
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert res.exit_code == 0, res.output
    for title in ("Downstream accuracy", "Perplexity by position", "Passkey retrieval"):
        assert title in res.output
    data = json.loads(out.read_text())
    assert data["status"] == "complete" and data["completed"] == ["downstream", "longppl", "passkey"]
    conforms(data["downstream"], DOWNSTREAM_SCHEMA)
    conforms(data["long_perplexity"], LONGPPL_SCHEMA)
    conforms(data["passkey"], PASSKEY_SCHEMA)
    assert list(data["downstream"]["tasks"]) == ["next_line"] and data["downstream"]["tasks"]["next_line"]["items"] == 6
    assert [b["end"] for b in data["long_perplexity"]["buckets"]] == [1024, 1500]
    assert data["passkey"]["lengths"] == [300] and len(data["passkey"]["cells"]) == 2
    assert png.stat().st_size > 10_000  # no speed or max length: the evaluation figure takes the name
    bad = [
        (["--passkey-lengths", "x"], "--passkey-lengths"),
        (["--passkey-trials", "0"], "--passkey-trials must be > 0"),
        (["--eval-limit", "0"], "--eval-limit must be > 0"),
        (["--tasks", "longppl", "--long-tokens", "100000"], "fewer than --long-tokens"),
        (["--eval-include", str(tmp_path / "missing")], "is not a folder"),
    ]
    for extra, message in bad:
        res = runner.invoke(app, [*args, "--tasks", "passkey", *extra])
        assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output


def test_an_unreachable_hub_switches_datasets_to_offline_mode_meanwhile(monkeypatch):
    pytest.importorskip("lm_eval")
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(downstream_mod.socket, "create_connection", unreachable)
    with downstream_mod._hub_offline_if_unreachable() as offline:
        assert offline and constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE
