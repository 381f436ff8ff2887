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
