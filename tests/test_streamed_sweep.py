"""Streamed sweep points and Shapley rounds: in-memory numbers, each layer read once per pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_tokens, spy_layer_loads

from depthprune.cli import main
from depthprune.data import load_calibration
from depthprune.errors import InputError
from depthprune.evaluate import evaluate, parse_task, task_score
from depthprune.evaluate.perplexity import PerplexityConfig, perplexity
from depthprune.loading import load_model
from depthprune.score.shapley import ShapleyConfig, estimate_shapley
from depthprune.score.shapley.games import ModelGame
from depthprune.score.values import KLValue, LossValue
from depthprune.streamed import (
    StreamConfig,
    evaluate_points_streamed,
    open_streamed,
)
from depthprune.streamed.games import StreamedGame
from depthprune.sweep import SweepConfig, sweep
from depthprune.units import ModelLayout, Unit, mask_units

# Perplexities and coalition values are means of float32-rounded per-token NLLs in memory
# and float64 sums from the chunked head streamed: they agree far inside the 1e-5.
REL = 1e-5
# A KL value, and a Shapley value, is a difference of such means (the kl value a mean of
# differences of log-probabilities): each in-memory log-probability carries about one
# float32 ulp of |log p| (4.8e-7 for these 320-512-token vocabularies), averaged over 19+
# independent roundings, so the difference is off by a fraction of an ulp absolutely,
# however small the value (the same floor as leave-one-out in test_streamed.py; measured
# here: at most 4e-8). A Shapley value is a weighted sum of v(S + i) - v(S) whose weights
# add up to one, so its error is at most twice a value's.
ABS = 5e-7
CHUNKED = StreamConfig(head_chunk=96)  # the 320-token vocabulary spans four chunks


def _scores(n_layers: int) -> dict[str, Any]:
    """A scores document with two metrics that order every unit kind differently."""
    units = [f"{k}.{i}" for k in ("block", "attn", "mlp") for i in range(n_layers)]
    return {
        "model": "tiny",
        "n_layers": n_layers,
        "scores": {"up": {u: float(i) for i, u in enumerate(units)}, "down": {u: -float(i) for i, u in enumerate(units)}},
    }


# --------------------------------------------------------------------------- the sweep


def test_streamed_sweep_equals_in_memory_and_reads_each_layer_once(
    sharded_llama: Path, stream_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = load_model(sharded_llama)
    tasks = (f"ppl:{stream_text_file},seq_len=32,max_tokens=200,batch_size=2",)  # a short last window: padding
    config = SweepConfig(metrics=("up", "down"), units="block,attn,mlp", max_remove=3, tasks=tasks, show_progress=False)

    def evaluator(model: Any) -> dict[str, dict[str, Any]]:
        return {k: {"score": task_score(v)} for k, v in evaluate(model, lm.tokenizer, tasks, show_progress=False)["tasks"].items()}

    expected = sweep(lm.model, _scores(4), config, evaluator, out_dir=tmp_path / "mem")
    streamed = open_streamed(str(sharded_llama), CHUNKED)
    specs = [parse_task(t, {"show_progress": False}) for t in tasks]
    calls: list[int] = []

    def evaluate_points(points: list[list[str]]) -> list[dict[str, dict[str, Any]]]:
        calls.append(len(points))
        masks = [[Unit.parse(u) for u in p] for p in points]
        return [{k: {"score": task_score(v)} for k, v in r.items()} for r in evaluate_points_streamed(streamed, lm.tokenizer, specs, masks)]

    loads = spy_layer_loads(monkeypatch)
    got = sweep(streamed.model, _scores(4), config, out_dir=tmp_path / "str", evaluate_points=evaluate_points)
    # 3 kinds x 2 metrics x 3 removals + the unpruned point, each distinct set of units once.
    assert calls == [19]
    assert streamed.layer_reads == 4 and len(loads) == len(set(loads))  # one pass: each layer read once
    assert got.orders == expected.orders
    for kind, metric in expected.lines():
        for a, b in zip(expected.points[kind][metric], got.points[kind][metric], strict=True):
            assert a["removed"] == b["removed"]
            for task, r in a["results"].items():
                assert b["results"][task]["score"] == pytest.approx(r["score"], rel=REL), (kind, metric, a["k"])
    # A finished sweep resumes with nothing left to evaluate.
    sweep(streamed.model, _scores(4), config, out_dir=tmp_path / "str", evaluate_points=evaluate_points)
    assert calls == [19]


def test_stories260k_sweep_points_match_in_memory(stories_lm: Any, stories_dir: Path, shared: Path) -> None:
    text = shared / "data" / "tinystories" / "tinystories_sample.txt"
    spec = parse_task(f"ppl:{text},seq_len=64,max_tokens=400", {"show_progress": False})
    points = [[], [Unit("block", 2)], [Unit("block", 2), Unit("attn", 4)], [Unit("mlp", 0), Unit("mlp", 3)]]
    streamed = open_streamed(str(stories_dir), CHUNKED)
    got = evaluate_points_streamed(streamed, stories_lm.tokenizer, [spec], points)
    assert streamed.layer_reads == streamed.n_layers
    for masked, result in zip(points, got, strict=True):
        with mask_units(stories_lm.model, masked):
            expected = perplexity(stories_lm.model, stories_lm.tokenizer, text, spec.config)
        assert result[spec.text]["nll"] == pytest.approx(expected["nll"], rel=REL), masked
        assert result[spec.text]["n_scored"] == expected["n_scored"]


def test_cli_sweep_stream_matches_and_refuses_other_tasks(
    sharded_llama: Path, stream_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(_scores(4)))
    common = ["-q", "sweep", str(sharded_llama), "--scores", str(scores), "--metrics", "up", "--units", "attn", "--max-remove", "2"]
    ppl = ["--tasks", f"ppl:{stream_text_file},seq_len=32,max_tokens=128"]
    assert main([*common, *ppl, "-o", str(tmp_path / "a")]) == 0
    assert main([*common, *ppl, "--stream", "-o", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "sweep.json").read_text())["points"]["attn"]["up"] for d in "ab")
    assert [p["removed"] for p in a] == [p["removed"] for p in b] == [[], ["attn.0"], ["attn.0", "attn.1"]]
    for pa, pb in zip(a, b, strict=True):
        (task,) = pa["results"]
        assert pb["results"][task]["score"] == pytest.approx(pa["results"][task]["score"], rel=REL)
    capsys.readouterr()
    assert main([*common, "--tasks", f"hellaswag:{stream_text_file}", "--stream", "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "perplexity (ppl:) tasks only" in err[0]
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- Shapley


@pytest.mark.parametrize("value_cls", [LossValue, KLValue])
def test_a_round_of_coalitions_equals_in_memory_in_one_pass(sharded_llama: Path, value_cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    data = random_tokens()
    players = [Unit(k, i) for i in range(4) for k in ("attn", "mlp")]
    lm = load_model(sharded_llama)
    mem = ModelGame(ModelLayout.of(lm.model), value_cls(data), players, absent=(), batch_size=2)
    streamed = open_streamed(str(sharded_llama), CHUNKED)
    game = StreamedGame(streamed, value_cls(data), players, batch_size=2)
    g = torch.Generator().manual_seed(0)
    coalitions = sorted({0, game.full, *torch.randint(0, game.full, (30,), generator=g).tolist()})
    loads = spy_layer_loads(monkeypatch)
    got = game.evaluate(coalitions)
    assert streamed.layer_reads == 4 and len(loads) == len(set(loads))  # 30+ coalitions, each layer read once
    expected = mem.evaluate(coalitions)
    for c, a, b in zip(coalitions, expected, got, strict=True):
        assert b == pytest.approx(a, rel=REL, abs=ABS if value_cls is KLValue else 0), c
    assert game.evaluate([]) == [] and streamed.layer_reads == 4


@pytest.mark.parametrize(("estimator", "kinds"), [("exact", ("block",)), ("permutation", ("attn", "mlp"))])
def test_streamed_shapley_values_equal_in_memory(sharded_llama: Path, estimator: str, kinds: tuple[str, ...]) -> None:
    data = random_tokens()
    players = [Unit(k, i) for i in range(4) for k in kinds]
    config = ShapleyConfig(estimator=estimator, seed=7, batch_size=2, max_samples=None if estimator == "exact" else 4)
    lm = load_model(sharded_llama)
    expected = estimate_shapley(ModelGame(ModelLayout.of(lm.model), LossValue(data), players, batch_size=2), config, show_progress=False)
    streamed = open_streamed(str(sharded_llama), CHUNKED)
    game = StreamedGame(streamed, LossValue(data), players, batch_size=2)
    got = estimate_shapley(game, config, show_progress=False)
    assert got.evaluations == expected.evaluations and got.samples == expected.samples  # same seed, same coalitions
    for p in players:
        assert got.values[p] == pytest.approx(expected.values[p], abs=2 * ABS), p
    assert got.v_full == pytest.approx(expected.v_full, rel=REL)
    # Each round is one pass: layers read = rounds x layers, far fewer than one pass per coalition.
    assert streamed.layer_reads == game.rounds * 4 and game.rounds < got.evaluations
    assert got.game["execution"] == "layer-streamed"


def test_stories260k_shapley_matches_in_memory(stories_lm: Any, stories_dir: Path, shared: Path) -> None:
    text = shared / "data" / "tinystories" / "tinystories_sample.txt"
    data = load_calibration(str(text), stories_lm.tokenizer, n_sequences=3, seq_len=48)
    layout = ModelLayout.of(stories_lm.model)
    players = [Unit("block", i) for i in range(layout.n_layers)]
    config = ShapleyConfig(estimator="permutation", seed=1, batch_size=2, max_samples=2)
    expected = estimate_shapley(ModelGame(layout, KLValue(data), players, batch_size=2), config, show_progress=False)
    streamed = open_streamed(str(stories_dir), CHUNKED)
    game = StreamedGame(streamed, KLValue(data), players, batch_size=2)
    got = estimate_shapley(game, config, show_progress=False)
    assert got.evaluations == expected.evaluations
    for p in players:
        assert got.values[p] == pytest.approx(expected.values[p], rel=REL, abs=2 * ABS), p
    assert streamed.layer_reads == game.rounds * layout.n_layers


def test_cli_shapley_stream_matches_and_refuses(sharded_llama: Path, stream_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["-q", "shapley", str(sharded_llama), "--data", str(stream_text_file), "--samples", "3", "--seq-len", "16", "--estimator", "exact"]
    assert main([*common, "-o", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--stream", "-o", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    for unit, v in a["scores"]["shapley"].items():
        assert b["scores"]["shapley"][unit] == pytest.approx(v, abs=2 * ABS), unit
    assert b["meta"]["cost"]["stream_layer_reads"] == 4  # exact: every coalition in one round
    capsys.readouterr()
    assert main([*common, "--stream", "--no-cache", "-o", str(tmp_path / "c.json")]) == 2
    assert main(["-q", "shapley", str(sharded_llama), "--value", "mmlu", "--mmlu", str(tmp_path), "--stream", "-o", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--no-cache" in err[0] and "value 'mmlu' is not supported with --stream" in err[1]
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "d.json").exists()


def test_perplexity_config_is_shared_by_every_point(sharded_llama: Path, stream_text_file: Path) -> None:
    """Points differ only in their masks: same windows, same number of scored tokens."""
    lm = load_model(sharded_llama)
    spec = parse_task(f"ppl:{stream_text_file},seq_len=32,max_tokens=100", {"show_progress": False})
    assert isinstance(spec.config, PerplexityConfig)
    got = evaluate_points_streamed(open_streamed(str(sharded_llama)), lm.tokenizer, [spec], [[], [Unit("block", 1)]])
    assert got[0][spec.text]["n_scored"] == got[1][spec.text]["n_scored"] > 0
    assert got[0][spec.text]["nll"] != got[1][spec.text]["nll"]


def test_score_stream_computes_shapley_like_in_memory(sharded_llama: Path) -> None:
    from depthprune.score import ScoreConfig, score
    from depthprune.score.values import ValueConfig
    from depthprune.streamed import score_streamed

    data = random_tokens()
    shap = ShapleyConfig(estimator="permutation", seed=3, batch_size=2, max_samples=4)
    config = ScoreConfig(metrics=("cosine", "loo_loss", "shapley"), units=("attn", "mlp"), shapley=shap, value=ValueConfig("kl"), batch_size=2, show_progress=False)
    expected = score(load_model(sharded_llama).model, data, config)
    streamed = open_streamed(str(sharded_llama), CHUNKED)
    got = score_streamed(streamed, data, config)
    for metric, values in expected.scores.items():
        for unit, v in values.items():
            assert got.scores[metric][unit] == pytest.approx(v, rel=REL, abs=2 * ABS), (metric, unit)
    assert got.definitions["shapley"]["execution"] == "layer-streamed"
    evaluations = got.definitions["shapley"]["games"]["sublayer"]["evaluations"]
    # One pass for static + leave-one-out, then one per round of coalitions, not one per coalition.
    assert got.cost["stream_layer_reads"] % 4 == 0 and 4 < got.cost["stream_layer_reads"] < 4 * evaluations
    with pytest.raises(InputError, match="value 'mmlu' is not supported with --stream"):
        score_streamed(streamed, data, ScoreConfig(metrics=("shapley",), value=ValueConfig("mmlu", mmlu=str(sharded_llama)), show_progress=False))


@pytest.mark.slow  # two torchrun launches: about 20 s on the shared 2-core machine
def test_two_gloo_ranks_stream_shapley_and_sweep_like_one_process(sharded_llama: Path, stream_text_file: Path, tmp_path: Path) -> None:
    """torchrun, 2 ranks: Shapley's 3 batches split 2 + 1, the sweep's 4 windows 2 + 2; sums over ranks."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)])}
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(_scores(4)))
    shap = ["shapley", str(sharded_llama), "--data", str(stream_text_file), "--samples", "5", "--seq-len", "16", "--batch-size", "2",
            "--estimator", "exact", "--value", "kl", "--stream"]
    swp = ["sweep", str(sharded_llama), "--scores", str(scores), "--metrics", "up", "--units", "mlp", "--max-remove", "2",
           "--tasks", f"ppl:{stream_text_file},seq_len=32,max_tokens=128,batch_size=1", "--stream"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    for args, out in ((shap, "s.json"), (swp, "w")):
        assert main(["-q", *args, "-o", str(tmp_path / "one" / out)]) == 0
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "depthprune", "-q", *args, "-o", str(tmp_path / "two" / out)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "s.json").read_text())["scores"]["shapley"] for d in ("one", "two"))
    for unit, v in one.items():
        # Float64 sums added in another order (per rank, then over ranks): ~1e-15 apart.
        assert two[unit] == pytest.approx(v, rel=1e-9, abs=1e-12), unit
    one, two = (json.loads((tmp_path / d / "w" / "sweep.json").read_text())["points"]["mlp"]["up"] for d in ("one", "two"))
    for a, b in zip(one, two, strict=True):
        (task,) = a["results"]
        assert b["results"][task]["score"] == pytest.approx(a["results"][task]["score"], rel=1e-9)
