"""``linconv bench``: perplexity == a straightforward computation, the max-length search finds planted
limits, a real trial process is killed past its budget, the JSON schema is stable, CLI exit codes
and one-line errors, partial results saved when a later task fails."""

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, save_tiny, tiny_model, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

import linconv
from linconv import report
from linconv.bench import maxlen as maxlen_mod
from linconv.bench import trials
from linconv.bench.maxlen import search_max_length
from linconv.bench.perplexity import perplexity
from linconv.bench.run import BenchSettings, run_bench
from linconv.bench.tasks import DEFAULT_TASKS, TASKS
from linconv.bench.trials import GIB, ProcessTrial, Trial
from linconv.checkpoint import save_checkpoint
from linconv.cli import app
from linconv.errors import LinconvError
from linconv.progress import Progress

runner = CliRunner()
TEXT = " ".join(["the quick brown fox jumps over the lazy dog. linear attention replaces softmax with a kernel feature map."] * 60)
FAST = [
    "--ppl-window",
    "32",
    "--ppl-tokens",
    "256",
    "--contexts",
    "8,16",
    "--decode-tokens",
    "3",
    "--repeats",
    "1",
    "--threads",
    "1",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny llama baseline folder, its linconv checkpoint (recording the baseline as source), a text."""
    root = tmp_path_factory.mktemp("bench")
    base = root / "base"
    save_tiny("llama", base)
    model = linconv.convert(str(base), linconv.LinearizeConfig(source=str(base), group_size=8, conv_kernel=3))
    save_checkpoint(model, tiny_tokenizer(), root / "ckpt", card={})
    (root / "text.txt").write_text(TEXT)
    return {"base": base, "ckpt": root / "ckpt", "text": root / "text.txt", "root": root}


# --- perplexity ------------------------------------------------------------------------------------


def reference_perplexity(model, tokens, window):
    """Straightforward: full logits per window, cross_entropy over every next-token prediction."""
    n = tokens.numel() // window
    rows = tokens[: n * window].view(n, window)
    with torch.no_grad():
        logits = model(rows, use_cache=False).logits  # [N, W, V]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), rows[:, 1:].flatten())
    return math.exp(loss.item())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_equals_full_logits_cross_entropy(arch):
    model = tiny_model(arch)
    tokens = torch.randint(0, TINY_VOCAB, (5 * 40 + 7,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, tokens, window=40, batch_size=2, chunk=7)  # chunks and batches that do not divide evenly
    assert got.windows == 5 and got.tokens == 200 and got.scored == 5 * 39
    assert got.perplexity == pytest.approx(reference_perplexity(model, tokens, 40), rel=1e-5)


def test_perplexity_of_a_linconv_model_and_max_tokens():
    model = linconv.convert(tiny_model("qwen2"), linconv.LinearizeConfig(group_size=4, conv_kernel=3))
    tokens = torch.randint(0, TINY_VOCAB, (300,), generator=torch.Generator().manual_seed(1))
    got = perplexity(model, tokens, window=32, max_tokens=100)
    assert got.windows == 3
    assert got.perplexity == pytest.approx(reference_perplexity(model, tokens[:96], 32), rel=1e-5)


def test_perplexity_needs_one_window():
    with pytest.raises(LinconvError, match="fewer than one window"):
        perplexity(tiny_model("llama"), torch.arange(10), window=32)


# --- max-length search -----------------------------------------------------------------------------


def planted(memory=None, time=None):
    """A fake trial: lengths above ``memory`` run out of memory, above ``time`` time out."""
    calls = []

    def trial(n):
        calls.append(n)
        if memory is not None and n > memory:
            return "memory"
        return "time" if time is not None and n > time else "ok"

    return trial, calls


@pytest.mark.parametrize("limit", [1000, 1024, 5000, 20000, 65535])
def test_search_finds_a_planted_memory_limit(limit):
    trial, calls = planted(memory=limit)
    found = search_max_length(trial, start=1024, cap=1 << 20, granularity=256)
    assert found.bound == "memory"
    assert found.max_length <= limit < found.first_failure
    assert found.first_failure - found.max_length <= 256
    assert len(calls) <= 2 + math.log2(limit / 1024 + 1) + math.log2(limit / 256 + 1)
    assert [t.length for t in found.trials] == calls


def test_search_reports_time_and_cap():
    trial, _ = planted(memory=50000, time=9000)
    found = search_max_length(trial, start=1024, cap=1 << 20, granularity=512)
    assert found.bound == "time" and found.max_length <= 9000 < found.first_failure
    trial, calls = planted(memory=10**9)
    found = search_max_length(trial, start=1024, cap=40000, granularity=512)
    assert (found.max_length, found.bound, found.first_failure) == (40000, "cap", None)
    assert calls == [1024, 2048, 4096, 8192, 16384, 32768, 40000]  # the cap itself is tried


def test_search_below_the_start():
    trial, _ = planted(memory=300)
    found = search_max_length(trial, start=1024, cap=4096, granularity=64)
    assert found.max_length <= 300 < found.first_failure and found.bound == "memory"
    trial, _ = planted(memory=10)
    assert search_max_length(trial, start=1024, cap=4096, granularity=64).max_length == 0


def test_trial_processes_memory_and_time_limits(tmp_path):
    """Real child processes (run side by side to save time):

    - memory: the child loads the model, starts working and is killed once its RSS passes the budget.
      The budget is this test process's RSS + 300 MiB: a child has imported the same libraries, so it
      loads under it; its forward at 8K tokens then needs ~800 MiB for the wide MLP;
    - a trial that fits reports its own peak, not this (deliberately bloated) parent's;
    - time: the limit counts from the end of loading; a trial past it is killed and reported;
    - a budget below the loaded model is a one-line LinconvError, not a result.
    """
    save_tiny("llama", tmp_path / "wide", hidden_size=64, intermediate_size=8192, num_attention_heads=4, num_key_value_heads=4)
    budget = trials.process_rss(os.getpid()) + 300 * 2**20
    bloat = torch.ones(2**28)  # 1 GiB resident in the parent while the children start
    parent_rss = trials.process_rss(os.getpid())
    memory = ProcessTrial(tmp_path / "wide", "forward", budget_bytes=budget, timeout_s=120, threads=1)
    fits = ProcessTrial(tmp_path / "wide", "forward", budget_bytes=64 * GIB, timeout_s=120, threads=1)
    slow = ProcessTrial(tmp_path / "wide", "generate", budget_bytes=64 * GIB, timeout_s=0.0, threads=1)
    tiny = ProcessTrial(tmp_path / "wide", "forward", budget_bytes=32 * 2**20, timeout_s=60, threads=1)
    with ThreadPoolExecutor(4) as pool:
        big, ok, late, small = pool.submit(memory, 8192), pool.submit(fits, 64), pool.submit(slow, 4096), pool.submit(tiny, 64)
        big, ok, late = big.result(), ok.result(), late.result()
        with pytest.raises(LinconvError, match="smaller than the model"):
            small.result()
    del bloat
    assert 0 < memory.loaded_bytes < budget
    assert big.outcome == "memory" and big.peak_bytes > budget
    assert ok.outcome == "ok" and fits.loaded_bytes <= ok.peak_bytes < fits.loaded_bytes + 256 * 2**20 < parent_rss
    assert late.outcome == "time" and slow.loaded_bytes > 0


# --- the whole run, JSON and CLI -------------------------------------------------------------------


class FakeTrial:
    """Stands in for ProcessTrial: the linearized model fits any length, the original 3000 tokens."""

    def __init__(self, folder, mode, *, budget_bytes, timeout_s, **kwargs):
        self.limit = 10**9 if "ckpt" in str(folder) else 3000
        self.loaded_bytes = 123

    def __call__(self, n):
        return Trial(n, "ok" if n <= self.limit else "memory", 0.01, 1000 + n)


EXPECTED_KEYS = {
    "": [
        "completed",
        "created",
        "downstream",
        "environment",
        "errors",
        "leakage",
        "long_perplexity",
        "max_length",
        "models",
        "notes",
        "passkey",
        "perplexity",
        "schema_version",
        "settings",
        "spec",
        "speed",
        "status",
        "text",
    ],
    "settings": [
        "baseline",
        "checkpoint",
        "compile",
        "contexts",
        "decode_tokens",
        "device",
        "dtype",
        "eval_include",
        "eval_limit",
        "eval_tasks",
        "granularity",
        "long_tokens",
        "max_len_cap",
        "max_len_start",
        "maxlen_new_tokens",
        "memory_budget_gib",
        "passkey_depths",
        "passkey_lengths",
        "passkey_trials",
        "ppl_tokens",
        "ppl_window",
        "prefill_chunk",
        "repeats",
        "spec_drafts",
        "spec_tokens",
        "tasks",
        "text",
        "threads",
        "trial_timeout_s",
    ],
    "environment": ["cpu_count", "device", "device_name", "dtype", "linconv", "platform", "python", "threads", "torch", "transformers"],
    "perplexity": ["linearized", "original", "ratio", "scored", "tokens", "window", "windows"],
    "perplexity.original": ["nll", "perplexity", "seconds", "tokens_per_s"],
    "max_length": ["budget_bytes", "cap", "forward", "generate", "granularity", "new_tokens", "start", "trial_timeout_s"],
    "max_length.generate": ["linearized", "original", "ratio"],
    "max_length.generate.original": ["bound", "first_failure", "loaded_bytes", "max_length", "seconds", "trials"],
    "speed": ["contexts", "decode_tokens", "linearized", "original", "prefill_chunk", "ratio", "repeats", "warmup"],
    "leakage": ["boundaries", "cut_points", "declared", "leaks", "max_change", "randomized", "seq_len", "tolerance"],
    "text": ["characters", "source", "tokens", "tokens_used"],
}


def test_full_run_json_schema_is_stable(folders, monkeypatch, tmp_path):
    monkeypatch.setattr(maxlen_mod, "ProcessTrial", FakeTrial)
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    res = runner.invoke(
        app,
        [
            "bench",
            str(folders["ckpt"]),
            "--text",
            str(folders["text"]),
            *FAST,
            "--max-len-cap",
            "16384",
            "--granularity",
            "512",
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Perplexity" in res.output and "Max sequence length" in res.output and "decode tokens/s vs context" in res.output
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1 and data["status"] == "complete" and data["errors"] == []
    for path, keys in EXPECTED_KEYS.items():
        node = data
        for part in filter(None, path.split(".")):
            node = node[part]
        assert sorted(node) == keys, path
    assert sorted(data["speed"]["original"][0]) == [
        "context",
        "decode_ms_per_token",
        "decode_tokens_per_s",
        "prefill_seconds",
        "prefill_tokens_per_s",
        "repeats",
        "state_bytes",
    ]
    assert sorted(data["max_length"]["forward"]["linearized"]["trials"][0]) == ["length", "outcome", "peak_bytes", "seconds"]
    gen = data["max_length"]["generate"]
    assert gen["original"]["bound"] == "memory" and 2560 <= gen["original"]["max_length"] <= 3000
    assert gen["linearized"]["bound"] == "cap" and gen["linearized"]["max_length"] == 16384
    assert data["leakage"]["leaks"] is False
    assert [p["context"] for p in data["speed"]["linearized"]] == [8, 16]
    assert png.stat().st_size > 10_000


def test_run_bench_perplexity_uses_the_same_tokens(folders):
    s = BenchSettings(checkpoint=str(folders["ckpt"]), text=str(folders["text"]), tasks=("ppl",), ppl_window=32, ppl_tokens=128, threads=1)
    result = run_bench(s)
    lin, orig = result.results["ppl"]["linearized"], result.results["ppl"]["original"]
    assert (lin.tokens, lin.windows) == (orig.tokens, orig.windows) == (128, 4)
    assert result.status == "complete"
    assert report.bench_json(result)["perplexity"]["ratio"] == pytest.approx(lin.perplexity / orig.perplexity)


class Recorder(Progress):
    """Keeps every call, to check what a run reports and in which order."""

    def __init__(self):
        self.calls = []

    def start(self, task, total=None, completed=0):
        self.calls.append(("start", task))

    def update(self, task, completed, total=None, **fields):
        self.calls.append(("update", task))

    def message(self, text):
        self.calls.append(("message", text))

    def end(self, task):
        self.calls.append(("end", task))


def test_run_bench_reports_every_task_through_progress_in_run_order(folders):
    s = BenchSettings(checkpoint=str(folders["ckpt"]), text=str(folders["text"]), tasks=("ppl", "leakage"), ppl_window=32, ppl_tokens=64)
    recorder = Recorder()
    result = run_bench(s, progress=recorder)
    started = [task for kind, task in recorder.calls if kind == "start"]
    assert started == ["setup", "leakage · linearized", "perplexity · original", "perplexity · linearized"]
    bounds = [call for call in recorder.calls if call[0] in ("start", "end")]
    assert bounds == [(kind, task) for task in started for kind in ("start", "end")]  # each ends before the next starts
    assert result.completed == ["leakage", "ppl"] and set(result.results) == {"leakage", "ppl"}


def test_tasks_option_is_the_registry():
    """--tasks help lists every registered task, and its default is the registry's default set."""
    res = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0
    for name, task in TASKS.items():
        assert f"{name} ({task.description})" in res.output
    assert f"[default: {','.join(DEFAULT_TASKS)}]" in res.output and "spec" not in DEFAULT_TASKS


def one_line_error(res, *fragments):
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for f in fragments:
        assert f in res.output, res.output


def test_bad_options_fail_fast(folders):
    ckpt = str(folders["ckpt"])
    one_line_error(runner.invoke(app, ["bench", ckpt, "--tasks", "ppl,nope"]), "unknown task nope")
    one_line_error(runner.invoke(app, ["bench", ckpt, "--contexts", "8,x"]), "--contexts")
    one_line_error(runner.invoke(app, ["bench", ckpt, "--plot", "out.svg"]), ".png")
    one_line_error(runner.invoke(app, ["bench", str(folders["root"] / "missing")]), "does not exist")
    one_line_error(runner.invoke(app, ["bench", str(folders["base"])]), "not a linconv checkpoint")


def test_empty_and_too_short_text(folders, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("the quick brown fox")
    args = ["bench", str(folders["ckpt"]), "--tasks", "ppl", *FAST]
    one_line_error(runner.invoke(app, [*args, "--text", str(tmp_path / "empty.txt")]), "empty")
    one_line_error(runner.invoke(app, [*args, "--text", str(tmp_path / "short.txt")]), "fewer than one window of 32")


def test_budget_smaller_than_the_weights(folders):
    res = runner.invoke(app, ["bench", str(folders["ckpt"]), "--tasks", "maxlen", "--memory-budget", "0.00001", *FAST])
    one_line_error(res, "smaller than the", "weights")


def test_different_tokenizers_are_refused(folders, tmp_path):
    other = tmp_path / "other"
    save_tiny("llama", other)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["a completely different corpus of words"] * 3, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"], show_progress=False)
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(other)
    res = runner.invoke(
        app, ["bench", str(folders["ckpt"]), "--baseline", str(other), "--tasks", "ppl", "--text", str(folders["text"]), *FAST]
    )
    one_line_error(res, "different tokenizers")


def test_partial_results_are_saved_when_a_later_task_fails(folders, tmp_path):
    """Perplexity succeeds; max length then fails (the budget is below a loaded Python + torch): exit 1, JSON kept."""
    out = tmp_path / "partial.json"
    res = runner.invoke(
        app,
        [
            "bench",
            str(folders["ckpt"]),
            "--tasks",
            "ppl,maxlen",
            "--text",
            str(folders["text"]),
            "--memory-budget",
            "0.05",
            "--json",
            str(out),
            *FAST,
        ],
    )
    one_line_error(res, "maxlen:", "smaller than the model", "partial results")
    data = json.loads(out.read_text())
    assert data["status"] == "failed" and data["completed"] == ["ppl"]
    from linconv.sources import load_source

    base, tokens = load_source(str(folders["base"]), ["llama"])[0], tiny_tokenizer()(TEXT)["input_ids"]
    expected = reference_perplexity(base, torch.tensor(tokens[:256]), 32)
    assert data["perplexity"]["original"]["perplexity"] == pytest.approx(expected, rel=1e-5) and data["max_length"] is None
    assert data["errors"][0]["task"] == "maxlen"


def test_baseline_none_and_the_no_baseline_tables(folders, tmp_path):
    out = tmp_path / "solo.json"
    res = runner.invoke(
        app,
        [
            "bench",
            str(folders["ckpt"]),
            "--baseline",
            "none",
            "--tasks",
            "ppl,leakage",
            "--text",
            str(folders["text"]),
            "--json",
            str(out),
            *FAST,
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["models"]["original"] is None and data["perplexity"]["original"] is None and data["perplexity"]["ratio"] is None


def test_spec_decode_section(folders, tmp_path):
    out = tmp_path / "s.json"
    res = runner.invoke(
        app,
        [
            "bench",
            str(folders["ckpt"]),
            "--text",
            str(folders["text"]),
            *FAST,
            "--tasks",
            "leakage",
            "--spec-decode",
            "--spec-tokens",
            "6",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Speculative decoding" in res.output
    spec = json.loads(out.read_text())["spec"]
    assert {(p["model"], p["prompt"]) for p in spec} == {(m, k) for m in ("original", "linearized") for k in ("grounded", "open")}
    assert all(p["identical"] and p["new_tokens"] == 6 for p in spec)
    bad = runner.invoke(app, ["bench", str(folders["ckpt"]), *FAST, "--tasks", "leakage", "--spec-decode", "--spec-tokens", "0"])
    assert bad.exit_code == 1 and "--spec-tokens must be > 0" in bad.output


def test_spec_decode_compares_every_draft_saved_with_the_checkpoint(folders, tmp_path):
    from linconv.speculative.eagle import EagleHead, save_eagle
    from linconv.speculative.medusa import MedusaHeads, save_medusa

    ckpt = tmp_path / "ckpt"
    shutil.copytree(folders["ckpt"], ckpt)
    model = linconv.load(ckpt)[0]
    save_medusa(MedusaHeads.for_model(model, 2), ckpt)
    save_eagle(EagleHead.for_model(model), ckpt)
    out = tmp_path / "s.json"
    args = ["bench", str(ckpt), "--text", str(folders["text"]), *FAST, "--tasks", "leakage", "--spec-decode", "--spec-tokens", "5"]
    res = runner.invoke(app, [*args, "--spec-drafts", f"auto,model:{folders['ckpt']}", "--json", str(out)])
    assert res.exit_code == 0, res.output
    spec = json.loads(out.read_text())["spec"]
    drafts = {m: {p["draft"] for p in spec if p["model"] == m} for m in ("original", "linearized")}
    other = f"model:{folders['ckpt']}"  # a linconv draft model
    assert drafts == {"original": {"lookup", other}, "linearized": {"lookup", "medusa", "eagle", other}}
    assert all(p["identical"] for p in spec) and all(len(p["acceptance_by_depth"]) >= 1 for p in spec if p["draft"] == "eagle")
    res = runner.invoke(app, ["bench", str(folders["ckpt"]), *args[2:], "--spec-drafts", "eagle"])
    assert res.exit_code == 1 and "no EAGLE head" in res.output


def test_gpt2_default_settings_fit_its_positions(tmp_path):
    """A GPT-2 takes at most n_positions tokens: the default contexts, window, caps and speculative
    prompts are cut to fit (and the report says so) instead of crashing."""
    base = tmp_path / "gpt2"
    save_tiny("gpt2", base)  # n_positions = 128
    model = linconv.convert(str(base), linconv.LinearizeConfig(source=str(base), group_size=8, conv_kernel=3))
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt", card={})
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "g.json"
    args = ["bench", str(tmp_path / "ckpt"), "--text", str(tmp_path / "text.txt"), "--tasks", "ppl,speed,leakage", "--spec-decode"]
    res = runner.invoke(app, [*args, "--ppl-tokens", "256", "--repeats", "1", "--threads", "1", "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["settings"]["contexts"] == [112] and data["settings"]["ppl_window"] == 128 and data["settings"]["spec_tokens"] == 32
    assert data["settings"]["max_len_cap"] == 120 and "at most 128 tokens" in data["notes"][0] and "adjusted" in res.output
    assert all(p["identical"] for p in data["spec"]) and data["leakage"]["leaks"] is False
