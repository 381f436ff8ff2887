"""The pruning sweep: orders, shared baseline, several unit kinds, budgets, resume, format 1, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model

from depthprune.data import pack
from depthprune.errors import InputError
from depthprune.score import ScoreConfig, score
from depthprune.sweep import SweepConfig, load_sweep, parse_budget, plot_sweep, sweep
from depthprune.units import mask_units


class _LossEval:
    """Mean LM loss on fixed tokens; counts its calls and can fail after a number of them."""

    def __init__(self, ids: torch.Tensor, fail_after: int | None = None) -> None:
        self.ids, self.calls, self.fail_after = ids, 0, fail_after

    def __call__(self, model: torch.nn.Module) -> dict[str, dict[str, Any]]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        with torch.no_grad():
            loss = float(model(self.ids, labels=self.ids).loss)
        return {"loss": {"score": loss, "protocol": "test"}}


@pytest.fixture
def setup() -> tuple[torch.nn.Module, dict[str, Any], torch.Tensor]:
    model = tiny_model("llama")
    stream = torch.randint(3, 300, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    data = pack(stream, 4, 16)
    scores = score(model, data, ScoreConfig(metrics=("cosine", "rel_l2", "loo_loss"), show_progress=False)).to_dict()
    return model, scores, data.input_ids


def _order(scores: dict[str, Any], metric: str, kind: str) -> list[str]:
    table = scores["scores"][metric]
    return sorted((u for u in table if u.startswith(f"{kind}.")), key=table.get)


def test_sweep_curves_follow_each_metric_order(setup: tuple, tmp_path: Path) -> None:
    model, scores, ids = setup
    ev = _LossEval(ids)
    cfg = SweepConfig(metrics=("cosine", "loo_loss"), units="attn", max_remove=3, show_progress=False)
    result = sweep(model, scores, cfg, ev, out_dir=tmp_path, model_name="tiny")
    assert ev.calls == 1 + 2 * 3  # the k=0 baseline is shared
    for metric in cfg.metrics:
        points = result.points["attn"][metric]
        assert [p["removed"] for p in points] == [_order(scores, metric, "attn")[:k] for k in range(4)]
        for p in points:
            with mask_units(model, p["removed"]), torch.no_grad():
                assert p["results"]["loss"]["score"] == pytest.approx(float(model(ids, labels=ids).loss), rel=1e-6)
    assert result.curve("attn", "cosine", "loss")[0] == result.curve("attn", "loo_loss", "loss")[0]
    assert result.removed_x("attn", "cosine") == ([0, 0.25, 0.5, 0.75], True)
    pngs = plot_sweep(result, tmp_path)
    assert [p.name for p in pngs] == ["sweep_loss.png"] and pngs[0].read_bytes()[:4] == b"\x89PNG"


def test_sweep_of_several_kinds_has_a_curve_per_kind_and_metric(setup: tuple, tmp_path: Path) -> None:
    model, scores, ids = setup
    ev = _LossEval(ids)
    cfg = SweepConfig(metrics=("cosine", "rel_l2"), units="mlp, block,attn", max_remove=0.5, show_progress=False)
    assert cfg.units == ("block", "attn", "mlp") and cfg.max_remove == 0.5  # canonical order
    result = sweep(model, scores, cfg, ev, out_dir=tmp_path, model_name="tiny")
    assert ev.calls == 1 + 3 * 2 * 2  # 4 layers: half of each kind is 2 units; one shared baseline
    assert result.lines() == [(k, m) for k in ("block", "attn", "mlp") for m in ("cosine", "rel_l2")]
    assert result.n_units == {"block": 4, "attn": 4, "mlp": 4}
    base = result.curve("block", "cosine", "loss")[0]
    for kind, metric in result.lines():
        points = result.points[kind][metric]
        assert [p["removed"] for p in points] == [_order(scores, metric, kind)[:k] for k in range(3)]
        assert [p["fraction"] for p in points] == [0.0, 0.25, 0.5]
        assert result.curve(kind, metric, "loss")[0] == base
        with mask_units(model, points[-1]["removed"]), torch.no_grad():
            assert points[-1]["results"]["loss"]["score"] == pytest.approx(float(model(ids, labels=ids).loss), rel=1e-6)
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert doc["format"] == 2 and doc["settings"]["units"] == ["block", "attn", "mlp"] and doc["settings"]["max_remove"] == 0.5
    assert set(doc["orders"]) == {"block", "attn", "mlp"} and set(doc["points"]["mlp"]) == {"cosine", "rel_l2"}
    assert load_sweep(tmp_path).points == result.points
    (png,) = plot_sweep(result, tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_budgets() -> None:
    assert parse_budget(3) == 3 and parse_budget("3") == 3 and parse_budget(2.0) == 2
    assert parse_budget("0.33") == 0.33
    for bad in (0, -1, 1.5, "many", True):
        with pytest.raises(InputError, match="count >= 1 .*or a fraction in \\(0, 1\\)"):
            parse_budget(bad)  # type: ignore[arg-type]
    cfg = SweepConfig(metrics=("cosine",), max_remove=0.33)
    assert (cfg.n_remove(32), cfg.n_remove(12), cfg.n_remove(3)) == (10, 3, 0)  # floor: never more than asked
    assert SweepConfig(metrics=("cosine",), max_remove=4).n_remove(32) == 4


def test_sweep_resumes_after_interruption(setup: tuple, tmp_path: Path) -> None:
    model, scores, ids = setup
    cfg = SweepConfig(metrics=("cosine", "rel_l2"), units=("block", "mlp"), max_remove=2, show_progress=False)
    full = sweep(model, scores, cfg, _LossEval(ids), out_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        sweep(model, scores, cfg, _LossEval(ids, fail_after=6), out_dir=tmp_path / "b")
    assert (tmp_path / "b" / "sweep.json").is_file()
    rest = _LossEval(ids)
    resumed = sweep(model, scores, cfg, rest, out_dir=tmp_path / "b")
    assert rest.calls == (1 + 2 * 2 * 2) - 6
    assert resumed.points == full.points
    for other in (
        SweepConfig(metrics=("cosine", "rel_l2"), units="block", max_remove=2),  # fewer kinds
        SweepConfig(metrics=("cosine", "rel_l2"), units="block,mlp", max_remove=0.5),  # the same K, said otherwise
        SweepConfig(metrics=("cosine",), units="block,mlp", max_remove=2),
    ):
        with pytest.raises(InputError, match="other settings"):
            sweep(model, scores, other, _LossEval(ids), out_dir=tmp_path / "b")


def _format_1(result: Any, kind: str) -> dict[str, Any]:
    """The sweep.json that depthprune wrote before several kinds could be swept."""
    settings = {**result.settings, "units": kind}
    points = {m: [{"k": p["k"], "removed": p["removed"], "results": p["results"]} for p in ps] for m, ps in result.points[kind].items()}
    return {"model": result.model, "settings": settings, "orders": result.orders[kind], "points": points, "meta": {"version": "0.1.0"}}


def test_format_1_files_are_read_and_resumed(setup: tuple, tmp_path: Path) -> None:
    model, scores, ids = setup
    cfg = SweepConfig(metrics=("cosine", "loo_loss"), units="attn", max_remove=2, show_progress=False)
    new = sweep(model, scores, cfg, _LossEval(ids), out_dir=tmp_path / "new", model_name="tiny")
    old = tmp_path / "old"
    old.mkdir()
    (old / "sweep.json").write_text(json.dumps(_format_1(new, "attn")))

    read = load_sweep(old / "sweep.json")
    assert read.settings == new.settings and read.orders == new.orders and read.n_units == {}
    assert read.curve("attn", "loo_loss", "loss") == new.curve("attn", "loo_loss", "loss")
    assert read.removed_x("attn", "cosine") == ([0.0, 1.0, 2.0], False)  # counts: the file has no unit totals
    assert plot_sweep(read, old)[0].is_file()

    ev = _LossEval(ids)
    resumed = sweep(model, scores, cfg, ev, out_dir=old, model_name="tiny")  # same settings: nothing to redo
    assert ev.calls == 0 and resumed.points == new.points
    assert json.loads((old / "sweep.json").read_text())["format"] == 2
    (old / "sweep.json").write_text(json.dumps({**_format_1(new, "attn"), "format": 9}))
    with pytest.raises(InputError, match="format 9"):
        load_sweep(old)


def test_sweep_bad_input(setup: tuple) -> None:
    model, scores, ids = setup
    with pytest.raises(InputError, match="Did you mean: cosine"):
        sweep(model, scores, SweepConfig(metrics=("cosin",)), _LossEval(ids))
    with pytest.raises(InputError, match="every block"):
        sweep(model, scores, SweepConfig(metrics=("cosine",), max_remove=4), _LossEval(ids))
    with pytest.raises(InputError, match="removes none"):
        sweep(model, scores, SweepConfig(metrics=("cosine",), units="attn", max_remove=0.2), _LossEval(ids))
    with pytest.raises(InputError, match="count >= 1"):
        SweepConfig(metrics=("cosine",), max_remove=0)
    with pytest.raises(InputError, match="unknown unit kind 'mpl'.*Did you mean: mlp"):
        SweepConfig(metrics=("cosine",), units="block,mpl")
    with pytest.raises(InputError, match="no unit kind"):
        SweepConfig(metrics=("cosine",), units=" , ")
    blocks_only = {**scores, "scores": {"cosine": {u: v for u, v in scores["scores"]["cosine"].items() if u.startswith("block.")}}}
    with pytest.raises(InputError, match="has no attn scores; it has block"):
        sweep(model, blocks_only, SweepConfig(metrics=("cosine",), units="block,attn"), _LossEval(ids))


def test_task_list_splitting() -> None:
    from depthprune.commands.sweep import split_task_list

    kinds = ["ppl", "mmlu", "hellaswag", "lm_eval"]
    assert split_task_list("ppl:a.txt,seq_len=64,mmlu:dir,limit=2,hellaswag:hs.txt.bz2,limit=9,lm_eval:hellaswag", kinds) == [
        "ppl:a.txt,seq_len=64",
        "mmlu:dir,limit=2",
        "hellaswag:hs.txt.bz2,limit=9",
        "lm_eval:hellaswag",
    ]


def test_sweep_cli_on_stories(stories_dir: Path, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from depthprune.cli import main

    text = shared / "data" / "tinystories" / "tinystories_sample.txt"
    scores = tmp_path / "scores.json"
    assert main(["score", str(stories_dir), "--data", str(text), "--samples", "4", "--seq-len", "64", "--metrics", "cosine,loo_loss", "-o", str(scores), "-q"]) == 0
    out = tmp_path / "sweep"
    argv = ["sweep", str(stories_dir), "--scores", str(scores), "--metrics", "cosine,loo_loss", "--units", "attn,mlp", "--max-remove", "0.4"]
    argv += ["--tasks", f"ppl:{text},seq_len=128,strip=true", "-o", str(out), "-q"]
    assert main(argv) == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["settings"]["units"] == ["attn", "mlp"] and doc["n_units"] == {"attn": 5, "mlp": 5}
    assert [len(doc["points"][k][m]) for k in ("attn", "mlp") for m in ("cosine", "loo_loss")] == [3, 3, 3, 3]  # floor(0.4 x 5) = 2
    base = doc["points"]["attn"]["cosine"][0]["results"]
    assert doc["points"]["mlp"]["loo_loss"][0]["results"] == base
    ppl0 = next(iter(base.values()))["score"]
    assert 3.0 < ppl0 < 6.0  # stories260K on its own domain (about 3.5 per story with BOS, 4.6 in 128-token windows)
    assert (out / "sweep_ppl_tinystories_sample.txt.png").is_file()
    printed = capsys.readouterr().out
    assert "wrote" in printed and " mlp     loo_loss" in printed
    assert main([a if a != "attn,mlp" else "attn,mpl" for a in argv]) == 2  # a typo: one line, exit 2
    assert "Did you mean: mlp" in capsys.readouterr().err
