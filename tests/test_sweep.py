"""The pruning sweep: orders, shared baseline, resume, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model

from depthprune.data import pack
from depthprune.errors import InputError
from depthprune.score import ScoreConfig, score
from depthprune.sweep import SweepConfig, plot_sweep, sweep
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


def test_sweep_curves_follow_each_metric_order(setup: tuple, tmp_path: Path) -> None:
    model, scores, ids = setup
    ev = _LossEval(ids)
    cfg = SweepConfig(metrics=("cosine", "loo_loss"), units="attn", max_remove=3, show_progress=False)
    result = sweep(model, scores, cfg, ev, out_dir=tmp_path, model_name="tiny")
    assert ev.calls == 1 + 2 * 3  # the k=0 baseline is shared
    for metric in cfg.metrics:
        order = sorted((u for u in scores["scores"][metric] if u.startswith("attn.")), key=scores["scores"][metric].get)
        points = result.points[metric]
        assert [p["removed"] for p in points] == [order[:k] for k in range(4)]
        for p in points:
            with mask_units(model, p["removed"]), torch.no_grad():
                assert p["results"]["loss"]["score"] == pytest.approx(float(model(ids, labels=ids).loss), rel=1e-6)
    assert result.curve("cosine", "loss")[0] == result.curve("loo_loss", "loss")[0]
    pngs = plot_sweep(result, tmp_path)
    assert [p.name for p in pngs] == ["sweep_loss.png"] and pngs[0].read_bytes()[:4] == b"\x89PNG"


def test_sweep_resumes_after_interruption(setup: tuple, tmp_path: Path) -> None:
    model, scores, ids = setup
    cfg = SweepConfig(metrics=("cosine", "rel_l2"), units="block", max_remove=2, show_progress=False)
    full = sweep(model, scores, cfg, _LossEval(ids), out_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        sweep(model, scores, cfg, _LossEval(ids, fail_after=3), out_dir=tmp_path / "b")
    assert (tmp_path / "b" / "sweep.json").is_file()
    rest = _LossEval(ids)
    resumed = sweep(model, scores, cfg, rest, out_dir=tmp_path / "b")
    assert rest.calls == 5 - 3
    assert resumed.points == full.points
    other = SweepConfig(metrics=("cosine",), units="block", max_remove=2, show_progress=False)
    with pytest.raises(InputError, match="other settings"):
        sweep(model, scores, other, _LossEval(ids), out_dir=tmp_path / "b")


def test_sweep_bad_input(setup: tuple) -> None:
    model, scores, ids = setup
    with pytest.raises(InputError, match="Did you mean: cosine"):
        sweep(model, scores, SweepConfig(metrics=("cosin",)), _LossEval(ids))
    with pytest.raises(InputError, match="every block"):
        sweep(model, scores, SweepConfig(metrics=("cosine",), max_remove=4), _LossEval(ids))
    with pytest.raises(InputError, match="at least 1"):
        SweepConfig(metrics=("cosine",), max_remove=0)


def test_task_list_splitting() -> None:
    from depthprune.commands.sweep import split_task_list

    kinds = ["ppl", "mmlu", "lm_eval"]
    assert split_task_list("ppl:a.txt,seq_len=64,mmlu:dir,limit=2,lm_eval:hellaswag", kinds) == [
        "ppl:a.txt,seq_len=64",
        "mmlu:dir,limit=2",
        "lm_eval:hellaswag",
    ]


def test_sweep_cli_on_stories(stories_dir: Path, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from depthprune.cli import main

    text = shared / "data" / "tinystories" / "tinystories_sample.txt"
    scores = tmp_path / "scores.json"
    assert main(["score", str(stories_dir), "--data", str(text), "--samples", "4", "--seq-len", "64", "--metrics", "cosine,loo_loss", "-o", str(scores), "-q"]) == 0
    out = tmp_path / "sweep"
    argv = ["sweep", str(stories_dir), "--scores", str(scores), "--metrics", "cosine,loo_loss", "--units", "attn", "--max-remove", "2"]
    argv += ["--tasks", f"ppl:{text},seq_len=128,strip=true", "-o", str(out), "-q"]
    assert main(argv) == 0
    doc = __import__("json").loads((out / "sweep.json").read_text())
    assert [len(doc["points"][m]) for m in ("cosine", "loo_loss")] == [3, 3]
    base = doc["points"]["cosine"][0]["results"]
    assert doc["points"]["loo_loss"][0]["results"] == base
    ppl0 = next(iter(base.values()))["score"]
    assert 3.0 < ppl0 < 6.0  # stories260K on its own domain (about 3.5 per story with BOS, 4.6 in 128-token windows)
    assert (out / "sweep_ppl_tinystories_sample.txt.png").is_file()
    assert "wrote" in capsys.readouterr().out
