"""The lm-evaluation-harness bridge: an offline local task on the in-memory model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from depthprune.errors import InputError
from depthprune.evaluate import HarnessConfig, evaluate, evaluate_harness, task_score
from depthprune.units import mask_units

pytest.importorskip("lm_eval")

DOCS = [
    {"context": "Once upon a time there was a little girl named", "choices": [" Lily", " table", " seven"], "label": 0},
    {"context": "The sun was shining and the birds were", "choices": [" blue", " singing", " eight"], "label": 1},
    {"context": "Tom went to the park to play with his", "choices": [" soup", " ten", " friends"], "label": 2},
    {"context": "She was very happy and gave her mom a big", "choices": [" hug", " rock", " car"], "label": 1},
]
TASK = """task: tiny_stories_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""






@pytest.fixture()
def task_dir(tmp_path: Path) -> Path:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_stories_choice.yaml").write_text(TASK.format(data=json.dumps(str(data))))
    return folder


@torch.no_grad()
def _reference_lls(model: torch.nn.Module, tok: Any, docs: list[dict]) -> list[list[float]]:
    """Each choice's summed log-probability given the context, from one plain forward pass
    over context + choice (float64 log-softmax)."""
    out = []
    for doc in docs:
        ctx = tok(doc["context"])["input_ids"]
        lls = []
        for choice in doc["choices"]:
            whole = tok(doc["context"] + choice)["input_ids"]
            assert whole[: len(ctx)] == ctx  # the choice starts a new token here
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        out.append(lls)
    return out


def _reference_accuracy(model: torch.nn.Module, tok: Any, docs: list[dict]) -> float:
    """Accuracy by argmax of each choice's summed log-probability, computed directly."""
    lls = _reference_lls(model, tok, docs)
    return sum(max(range(len(row)), key=row.__getitem__) == doc["label"] for row, doc in zip(lls, docs)) / len(docs)


def test_local_task_runs_offline_on_the_in_memory_model(stories_lm: Any, task_dir: Path) -> None:
    model, tok = stories_lm.model, stories_lm.tokenizer
    config = HarnessConfig(include_path=str(task_dir), batch_size=4)
    result = evaluate_harness(model, tok, "tiny_stories_choice", config)
    assert (result["metric"], result["higher_is_better"]) == ("acc,none", True)
    assert result["score"] == _reference_accuracy(model, tok, DOCS) == result["results"]["tiny_stories_choice"]["acc,none"]
    assert result["protocol"]["n_shot"] == {"tiny_stories_choice": 0}
    assert result["n_samples"]["tiny_stories_choice"]["effective"] == len(DOCS)
    assert tok.pad_token_id is None  # lm-eval got a copy of the tokenizer to change

    # The wrapper sees the model as it is: masked units stay masked.
    with mask_units(model, ["block.0", "block.1", "block.2", "block.3"]):
        masked = evaluate(model, tok, [f"lm_eval:tiny_stories_choice,include_path={task_dir},limit=2"], show_progress=False)
        expected = _reference_accuracy(model, tok, DOCS[:2])
    (only,) = masked["tasks"].values()
    assert task_score(only) == expected
    assert only["n_samples"]["tiny_stories_choice"]["effective"] == 2


def test_missing_data_file_is_an_input_error(stories_lm: Any, task_dir: Path) -> None:
    (task_dir.parent / "docs.jsonl").unlink()
    with pytest.raises(InputError, match="lm-eval could not run tiny_stories_choice: .*docs.jsonl"):
        evaluate_harness(stories_lm.model, stories_lm.tokenizer, "tiny_stories_choice", HarnessConfig(include_path=str(task_dir)))


@pytest.mark.slow
def test_unknown_task_lists_close_names(stories_lm: Any, task_dir: Path) -> None:
    # Not in include_path, so the built-in tasks are indexed too (several seconds).
    with pytest.raises(InputError, match="unknown lm-eval task 'tiny_stories_choise'.*Did you mean: tiny_stories_choice"):
        evaluate_harness(stories_lm.model, stories_lm.tokenizer, "tiny_stories_choise", HarnessConfig(include_path=str(task_dir)))


@pytest.mark.parametrize("masked", [[], ["attn.1", "mlp.3"]])
def test_bridge_loglikelihoods_match_a_direct_computation(stories_lm: Any, task_dir: Path, masked: list[str]) -> None:
    # Per document and choice, not accuracy: a wrong log-likelihood could still pick the
    # same choices on 4 documents. lm-eval runs the choices batched and right-padded in
    # float32, the reference one at a time in float64 after the same float32 logits: the
    # sums of 1-5 tokens agree to a few 1e-6 (measured 7e-6), so 1e-4 leaves room and still catches a token
    # off by one (a difference of whole nats).
    model, tok = stories_lm.model, stories_lm.tokenizer
    config = HarnessConfig(include_path=str(task_dir), batch_size=3, log_samples=True)
    with mask_units(model, masked):
        result = evaluate_harness(model, tok, "tiny_stories_choice", config)
        expected = _reference_lls(model, tok, DOCS)
    samples = sorted(result["samples"]["tiny_stories_choice"], key=lambda s: s["doc_id"])
    got = [[resp[0] for resp in s["filtered_resps"]] for s in samples]
    assert [[list(a) for a in s["arguments"]] for s in samples] == [[[d["context"], c] for c in d["choices"]] for d in DOCS]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    assert [s["acc"] for s in samples] == [int(max(range(3), key=row.__getitem__) == d["label"]) for row, d in zip(expected, DOCS)]
