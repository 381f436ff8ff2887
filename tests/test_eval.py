"""Perplexity against direct references, task specs, the evaluate() entry point and the CLI."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model, tiny_tokenizer

from depthprune.data import read_texts
from depthprune.errors import DepthPruneError, InputError
from depthprune.evaluate import (
    HarnessConfig,
    MMLUConfig,
    PerplexityConfig,
    evaluate,
    parse_task,
    task_score,
)
from depthprune.evaluate.perplexity import Window, _sha256, perplexity, plan_windows

TEXT = "the quick brown fox jumps over the lazy dog and the cat sat on the mat. " * 12






@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


# --------------------------------------------------------------------------- windows


def test_plan_windows_known_answers() -> None:
    # Non-overlapping: the first token of each window has no context and is not scored.
    assert plan_windows(10, 4) == [Window(0, 0, 4, 1), Window(0, 4, 8, 5), Window(0, 8, 10, 9)]
    # Sliding, stride 2: each window scores only what the previous one did not.
    assert plan_windows(10, 4, 2) == [Window(0, 0, 4, 1), Window(0, 2, 6, 4), Window(0, 4, 8, 6), Window(0, 6, 10, 8)]
    # A BOS in front of each window: 3 text tokens per window, all of them scored.
    assert plan_windows(10, 4, window_bos=True) == [
        Window(0, 0, 3, 0), Window(0, 3, 6, 3), Window(0, 6, 9, 6), Window(0, 9, 10, 9)
    ]  # fmt: skip
    assert plan_windows(1, 4) == []
    with pytest.raises(InputError, match="stride 5 is outside 1..4"):
        plan_windows(10, 4, 5)


@pytest.mark.parametrize(("n", "t", "s"), [(1000, 64, 16), (999, 64, 63), (50, 8, 3), (7, 16, 4)])
def test_sliding_windows_score_every_token_once_with_enough_context(n: int, t: int, s: int) -> None:
    windows = plan_windows(n, t, s)
    scored = [p for w in windows for p in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    for w in windows:
        assert w.end - w.start <= t
        for p in range(w.score_from, w.end):
            assert p - w.start >= min(p, t - s)  # context of at least T - S tokens


# --------------------------------------------------------------------------- perplexity


@torch.no_grad()
def _nll_sum(model: torch.nn.Module, ids: list[int], n_scored: int) -> float:
    """Summed NLL of the last ``n_scored`` tokens of ``ids`` given everything before them."""
    x = torch.tensor([ids])
    logits = model(x).logits[0, :-1].double()
    nll = F.cross_entropy(logits, x[0, 1:], reduction="none")
    return float(nll[-n_scored:].sum())


def test_stories_perplexity_is_exp_of_mean_nll(stories_lm: Any, shared: Path) -> None:
    sample = shared / "data" / "tinystories" / "tinystories_sample.txt"
    model, tok = stories_lm.model, stories_lm.tokenizer
    config = PerplexityConfig(documents="separate", bos="window", strip=True, show_progress=False)
    result = perplexity(model, tok, sample, config)
    total, count = 0.0, 0
    for story in read_texts(sample):
        ids = [tok.bos_token_id, *tok(story.strip(), add_special_tokens=False)["input_ids"]]
        assert len(ids) <= 512  # one window per story
        total += _nll_sum(model, ids, len(ids) - 1)
        count += len(ids) - 1
    assert result["n_scored"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]), rel=1e-12)
    assert 3.0 < result["perplexity"] < 4.5  # the model card says about 3.5

    # The default protocol: one stream (BOS, stories joined with EOS), windows of 512.
    default = perplexity(model, tok, sample, PerplexityConfig(show_progress=False))
    stream = [tok.bos_token_id]
    for i, story in enumerate(read_texts(sample)):
        stream += ([tok.eos_token_id] if i else []) + tok(story, add_special_tokens=False)["input_ids"]
    chunks = [stream[i : i + 512] for i in range(0, len(stream), 512)]
    total = sum(_nll_sum(model, c, len(c) - 1) for c in chunks)
    count = sum(len(c) - 1 for c in chunks)
    assert default["protocol"]["n_tokens"] == len(stream) and default["n_scored"] == count
    assert default["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


@torch.no_grad()
def _hf_guide(model: torch.nn.Module, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of the Hugging Face guide 'Perplexity of fixed-length models'.

    One fix: the guide counts ``valid labels - 1`` tokens per window, but after the first
    window the label that the model's shift drops is already -100, so the loss averages
    ``trg_len`` tokens, not ``trg_len - 1``. Here the count is of the shifted labels.
    """
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize(("seq_len", "stride"), [(32, 32), (32, 8), (40, 13)])
def test_sliding_window_matches_the_hf_guide(seq_len: int, stride: int, text_file: Path) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    config = PerplexityConfig(seq_len=seq_len, stride=stride, bos="none", batch_size=3, show_progress=False)
    result = perplexity(model, tok, text_file, config)
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    nll, n = _hf_guide(model, ids, seq_len, stride)
    assert result["n_scored"] == n
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["protocol"]["mode"] == ("windows" if stride == seq_len else "sliding")
    assert result["protocol"]["stride"] == stride and result["protocol"]["n_tokens"] == ids.size(1)


def test_wikitext_is_scored_as_the_raw_file(stories_lm: Any, shared: Path) -> None:
    wiki = shared / "data" / "wikitext-2-raw" / "wiki.test.raw"
    assert read_texts(wiki) == [wiki.read_text(encoding="utf-8")]  # one document, as it is
    config = PerplexityConfig(seq_len=512, max_tokens=2048, show_progress=False)
    result = perplexity(stories_lm.model, stories_lm.tokenizer, wiki, config)
    p = result["protocol"]
    assert (p["mode"], p["bos"], p["n_tokens"], p["n_windows"]) == ("windows", "stream", 2048, 4)
    assert result["n_scored"] == 2048 - 4


@pytest.mark.parametrize("documents", ["join", "separate"])
def test_max_tokens_is_a_recorded_leading_slice(documents: str, stories_lm: Any, shared: Path) -> None:
    sample = shared / "data" / "tinystories" / "tinystories_sample.txt"
    model, tok = stories_lm.model, stories_lm.tokenizer
    stories = [s.strip() for s in read_texts(sample)]
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in stories]
    if documents == "join":
        streams = [[tok.bos_token_id] + [t for i, s in enumerate(ids) for t in ([tok.eos_token_id] if i else []) + s]]
    else:
        streams = [[tok.bos_token_id, *s] for s in ids]
    n_max = len(streams[0]) + 40 if documents == "separate" else 300  # separate: all of story 1, 40 tokens of story 2
    config = PerplexityConfig(seq_len=128, max_tokens=n_max, documents=documents, bos="stream", strip=True, show_progress=False)  # type: ignore[arg-type]
    result = perplexity(model, tok, sample, config)

    # The reference: the first n_max tokens, cut by hand, in windows of 128.
    head, left = [], n_max
    for s in streams:
        head.append(s[:left])
        left -= len(head[-1])
        if left <= 0:
            break
    chunks = [s[i : i + 128] for s in head for i in range(0, len(s), 128)]
    total = sum(_nll_sum(model, c, len(c) - 1) for c in chunks if len(c) > 1)
    count = sum(len(c) - 1 for c in chunks)
    assert result["n_scored"] == count and result["nll"] == pytest.approx(total / count, rel=1e-5)
    # Any other slice of the same length scores another number: the test can tell them apart.
    tail = [streams[-1][-n_max:]] if documents == "join" else [streams[-1][-40:]]
    other = [t[i : i + 128] for t in tail for i in range(0, len(t), 128)]
    assert sum(_nll_sum(model, c, len(c) - 1) for c in other) / sum(len(c) - 1 for c in other) != pytest.approx(total / count, rel=1e-3)

    p = result["protocol"]
    assert p["max_tokens"] == p["config"]["max_tokens"] == p["n_tokens"] == n_max
    assert p["n_tokens_available"] == sum(len(s) for s in streams) > n_max
    assert p["n_streams"] == len(head) == (2 if documents == "separate" else 1)
    assert p["tokens_sha256"] == _sha256(head)
    whole = perplexity(model, tok, sample, PerplexityConfig(seq_len=128, documents=documents, bos="stream", strip=True, show_progress=False))  # type: ignore[arg-type]
    assert whole["protocol"]["max_tokens"] is None and whole["protocol"]["n_tokens"] == p["n_tokens_available"]


def test_perplexity_bad_input(text_file: Path, tmp_path: Path) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(InputError, match="exceeds the model's context of 128"):
        perplexity(model, tok, text_file, PerplexityConfig(seq_len=256))
    with pytest.raises(InputError, match="stride 64 is outside"):
        perplexity(model, tok, text_file, PerplexityConfig(seq_len=32, stride=64))
    with pytest.raises(InputError, match="does not exist"):
        perplexity(model, tok, tmp_path / "nope.txt")
    with pytest.raises(InputError, match="unknown bos mode"):
        PerplexityConfig(bos="sometimes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- specs


def test_parse_task_specs() -> None:
    spec = parse_task("ppl:data/wiki.test.raw,seq_len=1024,stride=512,bos=window")
    assert (spec.kind, spec.target) == ("ppl", "data/wiki.test.raw")
    assert spec.config == PerplexityConfig(seq_len=1024, stride=512, bos="window")
    spec = parse_task("mmlu:cais/mmlu,limit=20,shots=3,subjects=anatomy+virology,reuse_prefix=false")
    assert spec.config == MMLUConfig(limit=20, shots=3, subjects=("anatomy", "virology"), reuse_prefix=False)
    spec = parse_task("lm_eval:hellaswag,limit=5", defaults={"batch_size": 2, "show_progress": False})
    assert spec.config == HarnessConfig(limit=5, batch_size=2)
    assert parse_task("ppl:x.txt,batch_size=7", defaults={"batch_size": 2}).config.batch_size == 7  # spec wins


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("wiki.test.raw", "has no kind; expected KIND:TARGET"),
        ("mmmlu:data/mmlu", "unknown task kind 'mmmlu'.*Did you mean: mmlu\\?"),
        ("perplexity:x.txt", "unknown task kind 'perplexity'"),
        ("ppl:", "has no target"),
        ("ppl:x.txt,seqlen=5", "unknown option 'seqlen'.*Did you mean: seq_len\\?"),
        ("ppl:x.txt,seq_len=abc", "seq_len=abc .* must be an integer"),
        ("ppl:x.txt,seq_len", "is not key=value"),
        ("ppl:x.txt,bos=windw", "option bos .windw.*Did you mean: window\\? Available: auto, none, stream, window"),
        ("ppl:x.txt,stride=0", "stride must be at least 1"),
        ("mmlu:d,limit=1,limit=2", "given twice"),
        ("mmlu:d,shot=3", "Did you mean: shots\\?"),
        ("lm_eval:hellaswag,includepath=tasks", "Did you mean: include_path\\?"),
    ],
)
def test_bad_task_specs(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_task(spec)


def test_task_score_needs_a_result() -> None:
    assert task_score({"task": "ppl", "perplexity": 12.5}) == 12.5
    assert task_score({"task": "mmlu", "accuracy": 0.25}) == 0.25
    assert task_score({"task": "lm_eval", "score": 0.5}) == 0.5
    with pytest.raises(InputError, match="no 'task' field"):
        task_score({"perplexity": 1.0})


# --------------------------------------------------------------------------- evaluate() and the CLI


def _tiny_mmlu(root: Path) -> Path:
    for split, n in (("dev", 5), ("test", 3)):
        (root / split).mkdir(parents=True)
        rows = [f"the cat {i}?,fox,dog,mat,lazy,{i % 4}" for i in range(n)]
        (root / split / f"toy_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_evaluate_runs_every_kind_of_spec_and_records_the_protocol(text_file: Path, tmp_path: Path) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    mmlu = _tiny_mmlu(tmp_path / "mmlu")
    specs = [f"ppl:{text_file},seq_len=32", f"mmlu:{mmlu},limit=2"]
    out = evaluate(model, tok, specs, batch_size=2, show_progress=False)
    ppl, acc = out["tasks"][specs[0]], out["tasks"][specs[1]]
    assert ppl["spec"] == specs[0] and ppl["protocol"]["seq_len"] == 32 and ppl["protocol"]["config"]["batch_size"] == 2
    assert task_score(ppl) == ppl["perplexity"] > 1 and ppl["higher_is_better"] is False
    assert task_score(acc) == acc["micro_accuracy"] and acc["n"] == 2 and acc["protocol"]["shots"] == 5
    assert out["meta"]["version"]
    with pytest.raises(InputError, match="Did you mean: ppl"):
        evaluate(model, tok, [specs[0], "ppll:x"])  # every spec is checked before any work


def _cli(argv: list[str]) -> None:
    """Run a command as ``depthprune`` parses it, letting its errors raise."""
    from depthprune.cli import parse_args

    args = parse_args(argv)
    args.func(args)


def test_cli_eval_writes_json(tiny_model_dirs: dict[str, Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval.json"
    argv = ["eval", str(tiny_model_dirs["llama"]), "--task", f"ppl:{text_file},seq_len=32", "--json", str(out), "--quiet"]
    _cli([*argv, "--mask", "block.1"])
    data = json.loads(out.read_text())
    result = data["tasks"][f"ppl:{text_file},seq_len=32"]
    assert data["masked"] == ["block.1"] and result["perplexity"] > 1
    assert f"{result['perplexity']:.4f}" in capsys.readouterr().out  # the table
    with pytest.raises(DepthPruneError, match="already exists; pass --force"):
        _cli(argv)
    _cli([*argv, "--force"])  # no mask: another number
    assert json.loads(out.read_text())["tasks"][f"ppl:{text_file},seq_len=32"]["perplexity"] != result["perplexity"]
    with pytest.raises(InputError, match="Did you mean: mmlu"):
        _cli(["eval", str(tiny_model_dirs["llama"]), "--task", "mlu:x"])


@pytest.mark.parametrize(
    ("head", "tail", "hidden"),
    [([], [], False), (["-q"], [], True), ([], ["--quiet"], True), ([], ["-q"], True)],
    ids=["default", "global-q", "eval-quiet", "eval-q"],
)
def test_cli_eval_quiet_hides_the_progress_bar(
    head: list[str], tail: list[str], hidden: bool, tiny_model_dirs: dict[str, Path], text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from depthprune.cli import main

    # The package exports a function named perplexity, which hides the module's name.
    perplexity_module = importlib.import_module("depthprune.evaluate.perplexity")
    disabled: list[bool] = []
    real_counter = perplexity_module.counter

    def spy(total: int, desc: str, disable: bool = False) -> Any:
        disabled.append(disable)
        return real_counter(total, desc, disable)

    monkeypatch.setattr(perplexity_module, "counter", spy)
    task = f"ppl:{text_file},seq_len=32"
    assert main([*head, "eval", str(tiny_model_dirs["llama"]), "--task", task, *tail]) == 0
    assert disabled == [hidden]
