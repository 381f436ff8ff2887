"""HellaSwag: the file format, lm-eval's text cleaning, and per-item agreement with lm-eval."""

from __future__ import annotations

import bz2
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from depthprune.errors import InputError
from depthprune.evaluate import HellaSwagConfig, evaluate, parse_task, task_score
from depthprune.evaluate.hellaswag import (
    HellaSwagItem,
    ending_loglikelihoods,
    evaluate_hellaswag,
    load_hellaswag,
    predictions,
    prepare_hellaswag,
    preprocess,
    split_context,
)
from depthprune.units import mask_units

N_ITEMS = 20
# Summed log-likelihoods of ~10-40 tokens, about -30 to -120 nats, computed in float32 by
# two programs that batch and pad differently: each token's log-softmax differs by a few
# 1e-7 relative, so sums differ by a few 1e-5 (measured: 2e-5 on stories260K). 2e-4 is
# far below the gaps between endings that decide a prediction (see the margin check).
LL_TOL = 2e-4


def _hellaswag_file(shared: Path) -> Path:
    return shared / "data" / "hellaswag" / "hellaswag_val_full.txt.bz2"


# --------------------------------------------------------------------------- text


def test_preprocess_is_lm_evals() -> None:
    assert preprocess(" Food: [header] How to cook rice [title] Rinse the rice. [step] Use cold water. ") == (
        "Food: How to cook rice. Rinse the rice. Use cold water."
    )
    assert preprocess("Visit [www.kiddio.org] to find games") == "Visit to find games"
    lm_utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    for text in ("a [title] b", " x  [step] y [substeps] z ", "plain text.", "[header] A [title] B [step] C"):
        assert preprocess(text) == lm_utils.preprocess(text)


def test_split_context_finds_the_unfinished_sentence() -> None:
    assert split_context("Roof shingle removal: A man is sitting on a roof. he") == (
        "Roof shingle removal", "A man is sitting on a roof.", "he"
    )  # fmt: skip
    assert split_context('Cutting the grass: The words "cut it!" appear. a volunteer named " irene "') == (
        "Cutting the grass", 'The words "cut it!" appear.', 'a volunteer named " irene "'
    )  # fmt: skip
    wikihow = "Family Life: How to entertain a toddler. Ask the toddler what he would like."
    assert split_context(wikihow) == ("Family Life", "How to entertain a toddler. Ask the toddler what he would like.", "")
    assert split_context("High jump: the boy") == ("High jump", "", "the boy")
    with pytest.raises(InputError, match="does not start with 'activity label: '"):
        split_context("no label here")
    # lm-eval capitalizes ctx_b: the query of the first item.
    item = HellaSwagItem("Roof shingle removal", "A man is sitting on a roof.", "he", ("a", "b", "c", "d"), 3)
    assert item.query == "Roof shingle removal: A man is sitting on a roof. He"


def test_reads_the_shared_file(shared: Path) -> None:
    path = _hellaswag_file(shared)
    items = load_hellaswag(path)
    assert len(items) == 10_042
    first = items[0]
    assert (first.activity_label, first.ctx_a, first.ctx_b, first.label) == (
        "Roof shingle removal", "A man is sitting on a roof.", "he", 3
    )  # fmt: skip
    assert first.choices[3] == "starts pulling up roofing on a roof."
    assert load_hellaswag(path.parent, limit=5) == items[:5]  # the folder holds one data file
    assert load_hellaswag(path, limit=3, skip=7) == items[7:10]
    assert load_hellaswag(path, skip=10_040) == items[10_040:]
    assert {i.label for i in items} == {0, 1, 2, 3}


def _write_six_line(path: Path, records: list[list[str]]) -> Path:
    text = "".join(line + "\n" for rec in records for line in rec)
    if path.name.endswith(".bz2"):
        path.write_bytes(bz2.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_bad_hellaswag_files(tmp_path: Path) -> None:
    good = ["Act: a man walks. he", "1", "runs.", "sits.", "eats.", "flies."]
    ok = _write_six_line(tmp_path / "ok.txt.bz2", [good, good])
    assert len(load_hellaswag(ok)) == 2
    with pytest.raises(InputError, match="ends with a record of 5 lines"):
        load_hellaswag(_write_six_line(tmp_path / "short.txt", [good, good[:5]]))
    with pytest.raises(InputError, match=r"bad.txt:8: gold index '7' is not 0-3"):
        load_hellaswag(_write_six_line(tmp_path / "bad.txt", [good, [good[0], "7", *good[2:]]]))
    with pytest.raises(InputError, match="should hold one HellaSwag data file"):
        load_hellaswag(tmp_path)  # three files
    rows = tmp_path / "rows" / "rows.jsonl"
    rows.parent.mkdir()
    rows.write_text(json.dumps({"activity_label": "Act", "ctx_a": "x.", "ctx_b": "", "endings": ["a", "b"], "label": "0"}) + "\n")
    with pytest.raises(InputError, match="has 2 endings"):
        load_hellaswag(rows.parent)
    rows.write_text('{"ctx_a": "x"}\n')
    with pytest.raises(InputError, match=r"rows.jsonl:1 is not a HellaSwag row \(KeyError"):
        load_hellaswag(rows)
    with pytest.raises(InputError, match="does not exist"):
        load_hellaswag(tmp_path / "nope")


def test_spec_options() -> None:
    spec = parse_task("hellaswag:data/hellaswag,limit=50,batch_size=8")
    assert (spec.kind, spec.config) == ("hellaswag", HellaSwagConfig(limit=50, batch_size=8))
    with pytest.raises(InputError, match="Did you mean: limit\\?"):
        parse_task("hellaswag:data/hellaswag,limt=5")
    with pytest.raises(InputError, match="Did you mean: hellaswag\\?"):
        parse_task("helaswag:data/hellaswag")


# --------------------------------------------------------------------------- scoring


def _hub_rows(items: list[HellaSwagItem], path: Path) -> Path:
    """The items as JSON Lines in the fields of the Hub's Rowan/hellaswag rows."""
    rows = [
        {"activity_label": i.activity_label, "ctx_a": i.ctx_a, "ctx_b": i.ctx_b, "endings": list(i.endings), "label": str(i.label)}
        for i in items
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lm_eval_task(rows: Path, folder: Path) -> Path:
    """lm-eval's own hellaswag.yaml (with its process_docs), pointed at local rows."""
    lm_utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    folder.mkdir()
    (folder / "hellaswag_local.yaml").write_text(
        f"include: {json.dumps(str(Path(lm_utils.__file__).with_name('hellaswag.yaml')))}\n"
        "task: hellaswag_local\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {json.dumps(str(rows))}\n"
        "training_split: null\n"
        "validation_split: validation\n"
    )
    return folder


def test_matches_lm_eval_hellaswag_item_by_item(stories_lm: Any, shared: Path, tmp_path: Path) -> None:
    from depthprune.evaluate import HarnessConfig, evaluate_harness

    model, tok = stories_lm.model, stories_lm.tokenizer
    items = load_hellaswag(_hellaswag_file(shared), limit=N_ITEMS)
    rows = _hub_rows(items, tmp_path / "rows.jsonl")
    assert load_hellaswag(rows) == items  # the same items, read from Hub-style rows
    harness = evaluate_harness(model, tok, "hellaswag_local", HarnessConfig(include_path=str(_lm_eval_task(rows, tmp_path / "tasks")), log_samples=True))
    samples = sorted(harness["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    assert len(samples) == N_ITEMS

    # The same texts: lm-eval's (context, continuation) requests are our query and " " + choice.
    for item, s in zip(items, samples):
        assert [list(a) for a in s["arguments"]] == [[item.query, " " + c] for c in item.choices]

    # The same log-likelihood for every ending.
    prepared = prepare_hellaswag(tok, items, max_length=512)
    ours = ending_loglikelihoods(model, prepared, batch_size=7, show_progress=False)  # (N, 4)
    theirs = torch.tensor([[r[0] for r in s["filtered_resps"]] for s in samples], dtype=torch.float64)
    assert torch.allclose(ours, theirs, atol=LL_TOL, rtol=0), float((ours - theirs).abs().max())

    # The same choice per item, under acc and acc_norm; no choice is decided by a gap
    # within the tolerance.
    plain, norm = predictions(ours, items)
    assert [int(p == i.label) for p, i in zip(plain, items)] == [s["acc"] for s in samples]
    assert [int(p == i.label) for p, i in zip(norm, items)] == [s["acc_norm"] for s in samples]
    lengths = torch.tensor([[len(c) for c in i.choices] for i in items], dtype=torch.float64)
    assert plain == theirs.argmax(-1).tolist() and norm == (theirs / lengths).argmax(-1).tolist()
    for table in (theirs, theirs / lengths):
        top2 = table.topk(2, dim=-1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 2 * LL_TOL

    result = evaluate_hellaswag(model, tok, _hellaswag_file(shared), HellaSwagConfig(limit=N_ITEMS, show_progress=False))
    assert result["acc"] == harness["results"]["hellaswag_local"]["acc,none"]
    assert result["acc_norm"] == harness["results"]["hellaswag_local"]["acc_norm,none"]
    assert (result["predictions"], result["predictions_norm"]) == (plain, norm)
    assert result["labels"] == [i.label for i in items] and result["n"] == N_ITEMS
    p = result["protocol"]
    assert (p["limit"], p["n"], p["max_length"], p["n_truncated"], p["bos"]) == (N_ITEMS, N_ITEMS, 512, 0, True)
    from_rows = evaluate_hellaswag(model, tok, rows, HellaSwagConfig(show_progress=False))
    assert (from_rows["acc_norm"], from_rows["predictions_norm"]) == (result["acc_norm"], norm)
    assert from_rows["protocol"]["items_sha256"] == p["items_sha256"]


@torch.no_grad()
def _direct_ll(model: torch.nn.Module, seq: list[int], n: int) -> float:
    """Summed log-probability of the last ``n`` tokens of ``seq``, from one plain forward pass."""
    logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    return float(sum(logp[len(seq) - n - 1 + t, seq[len(seq) - n + t]] for t in range(n)))


def test_truncated_inputs_keep_their_end_and_batching_changes_nothing() -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = [
        HellaSwagItem("the cat", "the quick brown fox jumps over the lazy dog." * (i + 1), "the cat", ("sat on the mat.", "jumps over the dog", "the fox", "lazy"), i % 4)
        for i in range(5)
    ]
    prepared = prepare_hellaswag(tok, items, max_length=24)
    assert prepared.n_truncated > 0
    scores = ending_loglikelihoods(model, prepared, batch_size=3, show_progress=False)
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            whole = tok(item.query + " " + choice)["input_ids"]
            ctx = tok(item.query)["input_ids"]
            inp, n = prepared.rows[i][j]
            assert list(inp) == whole[-25:-1] and n == len(whole) - len(ctx)  # the last 24 tokens fed
            assert scores[i, j].item() == pytest.approx(_direct_ll(model, list(inp) + [whole[-1]], n), abs=1e-4)
    with mask_units(model, ["attn.1"]):
        one = ending_loglikelihoods(model, prepared, batch_size=1, show_progress=False)
        many = ending_loglikelihoods(model, prepared, batch_size=20, show_progress=False)
    assert torch.allclose(one, many, atol=1e-4, rtol=0)
    assert not torch.allclose(one, scores, atol=1e-3)  # the mask was on


def test_evaluate_spec_on_stories(stories_lm: Any, shared: Path) -> None:
    spec = f"hellaswag:{_hellaswag_file(shared).parent},limit=40"
    out = evaluate(stories_lm.model, stories_lm.tokenizer, [spec], batch_size=16, show_progress=False)
    result = out["tasks"][spec]
    assert task_score(result) == result["acc_norm"] and result["higher_is_better"] is True
    assert result["n"] == 40 and result["protocol"]["config"]["batch_size"] == 16
    assert 0.0 <= result["acc"] <= 1.0 and result["acc_stderr"] > 0
    assert result["protocol"]["data_file"].endswith("hellaswag_val_full.txt.bz2")


def test_eval_cli_prints_a_hellaswag_row(stories_dir: Path, shared: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from depthprune.cli import main

    spec = f"hellaswag:{_hellaswag_file(shared)},skip=3,limit=5"
    assert main(["eval", str(stories_dir), "--task", spec, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "acc_norm" in out and "5 items" in out and "0-shot" in out
