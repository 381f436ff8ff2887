"""The findings stage: its resumable point cache and verdicts computed from the numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from depthprune.errors import InputError
from depthprune.findings import Findings, FindingsSection, PointCache
from depthprune.findings_doc import write_findings_doc
from depthprune.units import Unit

PPL, ACC = "ppl:wiki.txt", "hellaswag:hs"


def _point(ppl: float, acc: float) -> dict[str, Any]:
    return {
        "scores": {PPL: {"score": ppl, "higher_is_better": False}, ACC: {"score": acc, "higher_is_better": True}}
    }


def _f1(attn_last: tuple[float, float]) -> dict[str, Any]:
    base = _point(10.0, 0.40)
    last = {"attn": _point(*attn_last), "mlp": _point(30.0, 0.30), "block": _point(60.0, 0.28)}
    return {
        "metric": "loo_loss",
        "counts": [0, 3],
        "n_layers": 9,
        "curves": {k: [{"k": 0, "fraction": 0.0, **base}, {"k": 3, "fraction": 1 / 3, **last[k]}] for k in last},
    }


def _doc(tmp_path: Path, **parts: Any) -> str:
    found = Findings(model="m", n_layers=9, tasks=[PPL, ACC], **parts)
    scores = {"calibration": {"n_sequences": 2, "seq_len": 8, "source": "x"}}
    path = write_findings_doc(found, scores, FindingsSection(tasks=[PPL, ACC], command="depthprune run r.yaml -o out"), tmp_path)
    return path.read_text()


def test_f1_verdict_follows_the_numbers(tmp_path: Path) -> None:
    text = _doc(tmp_path, f1=_f1((12.0, 0.39)))
    assert "**Reproduced** (F1)" in text and (tmp_path / "f1.png").is_file()
    assert "| 3 (33%) | 12.000 | 0.390 | 30.000 | 0.300 | 60.000 | 0.280 |" in text
    # Attention removal hurting the task more than MLP removal is not the paper's claim.
    text = _doc(tmp_path, f1=_f1((12.0, 0.10)))
    assert "**Not reproduced** (F1)" in text
    assert "depthprune run r.yaml -o out" in text


def test_f2_trade_is_detected_per_budget(tmp_path: Path) -> None:
    rows = [
        {"k": 0, "by_loss": {"removed": [], **_point(10, 0.4)}, "by_task": {"removed": [], **_point(10, 0.4)}},
        {"k": 2, "by_loss": {"removed": ["block.3"], **_point(12, 0.35)}, "by_task": {"removed": ["block.5"], **_point(14, 0.38)}},
        {"k": 4, "by_loss": {"removed": ["block.3"], **_point(15, 0.36)}, "by_task": {"removed": ["block.5"], **_point(14, 0.30)}},
    ]
    f2 = {"select_task": ACC, "select_baseline": 0.4, "task_loo": {}, "rows": rows}
    text = _doc(tmp_path, f2=f2)
    assert "**Partly reproduced** (F2)" in text and "at 1 of 2 budgets" in text


def test_f3_gain_and_earliest_unit(tmp_path: Path) -> None:
    def rows(none: float, bias: float) -> dict[str, Any]:
        return {
            "baseline_loss": 3.0,
            "rows": [
                {"method": "none", "loss": none, "delta_loss": none - 3.0},
                {"method": "bias", "loss": bias, "delta_loss": bias - 3.0},
            ],
        }

    f3 = {"fit": {"n_sequences": 4, "seq_len": 8}, "eval": {"n_sequences": 2}, "units": {"block.1": rows(7.0, 4.0), "block.5": rows(3.5, 3.4)}}
    text = _doc(tmp_path, f3=f3)
    assert "**Reproduced** (F3)" in text and "largest for `block.1` (the earliest unit measured)" in text
    f3["units"]["block.5"] = rows(3.5, 3.6)  # emulation hurts here
    assert "**Not reproduced** (F3)" in _doc(tmp_path, f3=f3)


def test_point_cache_measures_once_and_survives_a_restart(tmp_path: Path) -> None:
    calls = []

    def measure() -> dict[str, Any]:
        calls.append(1)
        return {"x": {"score": 1.5}}

    cache = PointCache(tmp_path / "points.json")
    units = [Unit("block", 2), Unit("attn", 1)]
    assert cache.get_or_measure(units, "none", ["t"], measure) == {"x": {"score": 1.5}}
    # Same set in another order: the same point.
    assert cache.get_or_measure(list(reversed(units)), "none", ["t"], measure) == {"x": {"score": 1.5}}
    again = PointCache(tmp_path / "points.json")
    again.get_or_measure(units, "none", ["t"], measure)
    assert len(calls) == 1
    again.get_or_measure(units, "bias", ["t"], measure)
    assert len(calls) == 2
    assert len(json.loads((tmp_path / "points.json").read_text())) == 2


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kinds": ["blok"]}, "unknown unit kind 'blok'"),
        ({"max_fraction": 1.5}, "max_fraction"),
        ({"step": 0}, "step"),
        ({"counts": [0]}, "counts"),
        ({"emulate_units": ["block.x"]}, "block.x"),
    ],
)
def test_section_validates(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        FindingsSection(**kwargs)


@pytest.mark.slow
def test_findings_stage_end_to_end_on_stories260k(
    stories_dir: Path, shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from depthprune.data import load_calibration
    from depthprune.evaluate import evaluate, task_score
    from depthprune.findings import run_findings
    from depthprune.loading import load_model
    from depthprune.pipeline import run_recipe
    from depthprune.recipe import recipe_from_dict
    from depthprune.scores_file import load_scores
    from depthprune.units import mask_units

    stories = str(shared / "data" / "tinystories" / "tinystories_sample.txt")
    ppl = f"ppl:{stories},seq_len=64,max_tokens=128"
    hs = str(shared / "data" / "hellaswag")
    doc = tmp_path / "docs" / "findings.md"
    recipe = recipe_from_dict(
        {
            "model": str(stories_dir),
            "data": {"source": stories, "samples": 4, "seq_len": 64},
            "tasks": [ppl, f"hellaswag:{hs},skip=10,limit=4"],
            "score": {"metrics": ["cosine", "rel_l2", "loo_loss"], "units": ["block", "attn", "mlp"]},
            "plan": {"metric": "loo_loss", "units": "block", "remove": 1},
            "sweep": None,
            "report": False,
            "findings": {
                "kinds": ["block", "attn"], "max_fraction": 0.45, "step": 1,
                "static_metrics": ["cosine", "loo_loss"], "static_max_remove": 2, "static_tasks": [ppl],
                "select_task": f"hellaswag:{hs},limit=4", "counts": [1],
                "emulate_units": ["block.0"], "emulate_methods": ["none", "bias"], "learned": [],
                "fit_samples": 4, "eval_samples": 2, "doc": str(doc), "command": "depthprune run r.yaml -o out",
            },
        }
    )
    out = tmp_path / "run"
    run_recipe(recipe, out, show_progress=False)
    found = json.loads((out / "findings" / "findings.json").read_text())
    assert found["f1"]["counts"] == [0, 1, 2] and set(found["f1"]["curves"]) == {"block", "attn"}
    assert len(found["f2"]["task_loo"]) == 5 and [r["k"] for r in found["f2"]["rows"]] == [0, 1]
    rows = found["f3"]["units"]["block.0"]["rows"]
    assert {r["method"] for r in rows} == {"none", "bias"} and all(set(r["tasks"]) == set(found["tasks"]) for r in rows)
    # A stored point is the task score of the masked model, recomputed here directly.
    lm = load_model(str(stories_dir))
    point = found["f1"]["curves"]["attn"][2]
    with mask_units(lm.model, point["removed"]):
        direct = task_score(evaluate(lm.model, lm.tokenizer, [ppl], show_progress=False)["tasks"][ppl])
    assert point["scores"][ppl]["score"] == pytest.approx(direct, rel=1e-9)
    text = doc.read_text()
    assert "(F1)" in text and "(F2)" in text and "(F3)" in text and "](findings/f1.png)" in text
    assert (doc.parent / "findings" / "f1.png").is_file() and (doc.parent / "findings" / "static.png").is_file()
    # Every point was stored; a second run of the stage measures nothing again.
    points = json.loads((out / "findings" / "points.json").read_text())
    calls = []
    original = PointCache.get_or_measure

    def spy(self: PointCache, removed: Any, stand_in: str, tasks: Any, measure: Any) -> Any:
        return original(self, removed, stand_in, tasks, lambda: calls.append(1) or measure())

    monkeypatch.setattr(PointCache, "get_or_measure", spy)
    data = load_calibration(stories, lm.tokenizer, 6, 64, 1)
    assert isinstance(recipe.findings, FindingsSection)
    run_findings(lm.model, lm.tokenizer, data, load_scores(out / "scores.json"), recipe.findings, out / "findings", "m", recipe.tasks, False)
    assert calls == [] and json.loads((out / "findings" / "points.json").read_text()) == points


def test_f1_leaves_out_an_accuracy_slice_too_small_to_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import depthprune.findings_doc as doc_mod

    # 40 items at p=0.4: one standard error is 0.077; a spread of 0.1 between kinds is noise.
    monkeypatch.setattr(doc_mod, "_accuracy_stderr", lambda spec, p: 0.0775 if spec == ACC else None)
    text = _doc(tmp_path, f1=_f1((12.0, 0.30)))  # attention worst on the accuracy, cheapest on perplexity
    assert "**Reproduced** (F1)" in text and "(not hellaswag" in text and "not resolved" in text
    monkeypatch.setattr(doc_mod, "_accuracy_stderr", lambda spec, p: None)
    assert "**Not reproduced** (F1)" in _doc(tmp_path, f1=_f1((12.0, 0.10)))
