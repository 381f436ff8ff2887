"""Shapley values: known answers on toy games, agreement with exact values on stories260K,
prefix caching, budgets, resume, value functions, iterative pruning and the CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from depthprune.data import TokenBatches, load_calibration, pack
from depthprune.errors import CheckpointError, InputError
from depthprune.score import ScoreConfig, score
from depthprune.score.iterative import IterativeConfig, iterative_prune
from depthprune.score.shapley import (
    FunctionGame,
    ModelGame,
    ShapleyConfig,
    estimate_shapley,
    shapley_units,
)
from depthprune.score.values import MultipleChoiceValue, ValueConfig, make_value
from depthprune.units import ModelLayout, Unit, all_units, mask_units



# A toy game with known Shapley values: additive weights, a pairwise interaction (a, c)
# worth 3 (1.5 each) and a three-way one (b, d, e) worth 6 (2 each).
WEIGHTS = {"a": 1.0, "b": -0.5, "c": 2.0, "d": 0.25, "e": 0.0, "f": 0.7}
KNOWN = {"a": 2.5, "b": 1.5, "c": 3.5, "d": 2.25, "e": 2.0, "f": 0.7}


def _toy(present: frozenset[str]) -> float:
    value = sum(WEIGHTS[p] for p in present)
    value += 3.0 if {"a", "c"} <= present else 0.0
    value += 6.0 if {"b", "d", "e"} <= present else 0.0
    return value


def _additive(present: frozenset[str]) -> float:
    return sum(WEIGHTS[p] for p in present)


def _within(result, truth: dict[str, float], k: float = 4.0) -> None:
    for p, want in truth.items():
        err = result.stderr[p]
        assert abs(result.values[p] - want) <= k * err + 1e-9, (p, result.values[p], want, err)


# --------------------------------------------------------------------------- toy games


def test_exact_recovers_known_values_and_efficiency() -> None:
    game = FunctionGame(list(WEIGHTS), _toy)
    result = estimate_shapley(game, ShapleyConfig(estimator="exact"), show_progress=False)
    for p, want in KNOWN.items():
        assert result.values[p] == pytest.approx(want, abs=1e-12)
        assert result.stderr[p] == 0.0
    assert result.v_full - result.v_empty == pytest.approx(sum(KNOWN.values()))
    assert abs(result.efficiency_gap) < 1e-12
    assert result.evaluations == 64 and result.stopped == "complete"


@pytest.mark.parametrize("design", ["cyclic", "independent"])
def test_permutation_recovers_known_values_within_error(design: str) -> None:
    game = FunctionGame(list(WEIGHTS), _toy)
    result = estimate_shapley(game, ShapleyConfig(design=design, max_samples=60, seed=1), show_progress=False)
    _within(result, KNOWN)
    # Every antithetic pair's marginal contributions sum to v(all) - v(none).
    assert abs(result.efficiency_gap) < 1e-9
    # The three-way interaction makes sampling noisy; the additive player f is exact.
    assert result.stderr["b"] > 0 and result.values["f"] == pytest.approx(0.7, abs=1e-12)


def test_independent_antithetic_pairs_are_exact_for_pairwise_games() -> None:
    pairwise = FunctionGame(list(WEIGHTS), lambda s: _additive(s) + (3.0 if {"a", "c"} <= s else 0.0))
    result = estimate_shapley(pairwise, ShapleyConfig(design="independent", max_samples=5), show_progress=False)
    for p in WEIGHTS:
        want = WEIGHTS[p] + (1.5 if p in "ac" else 0.0)
        assert result.values[p] == pytest.approx(want, abs=1e-12) and result.stderr[p] == pytest.approx(0.0, abs=1e-12)


def test_local_recovers_additive_values() -> None:
    game = FunctionGame(list(WEIGHTS), _additive)
    result = estimate_shapley(game, ShapleyConfig(estimator="local", local_k=2, max_samples=300, seed=2), show_progress=False)
    _within(result, WEIGHTS)
    total_err = math.sqrt(sum(e * e for e in result.stderr.values()))
    assert abs(result.efficiency_gap) <= 4 * total_err
    # The paper's raw number, mean present - mean absent, is (n w_i - W) / (n - 1) in expectation.
    n, total = len(WEIGHTS), sum(WEIGHTS.values())
    raw = result.details["present_minus_absent"]
    for p, w in WEIGHTS.items():
        assert raw[p] == pytest.approx((n * w - total) / (n - 1), abs=4 * result.details["present_minus_absent_stderr"][p])


def test_exact_refuses_more_than_twelve_players_and_bad_settings() -> None:
    big = FunctionGame([f"p{i}" for i in range(13)], lambda s: float(len(s)))
    with pytest.raises(InputError, match="at most 12 players.*--estimator permutation"):
        estimate_shapley(big, ShapleyConfig(estimator="exact"), show_progress=False)
    with pytest.raises(InputError, match="Did you mean: permutation"):
        ShapleyConfig(estimator="permutaton")
    with pytest.raises(InputError, match="tol"):
        ShapleyConfig(tol=-1.0)
    with pytest.raises(InputError, match="local_k 6 is out of range"):
        estimate_shapley(FunctionGame(list(WEIGHTS), _toy), ShapleyConfig(estimator="local", local_k=6), show_progress=False)


def test_budget_and_tol_stop_sampling() -> None:
    game = FunctionGame(list(WEIGHTS), _toy)
    result = estimate_shapley(game, ShapleyConfig(design="independent", budget=50, round_size=3), show_progress=False)
    assert result.stopped == "budget" and result.layer_evals <= 50 and result.samples >= 1
    result = estimate_shapley(game, ShapleyConfig(tol=0.2, max_samples=10_000), show_progress=False)
    assert result.stopped == "tol" and max(result.stderr.values()) < 0.2
    with pytest.raises(InputError, match="too small for one sample"):
        estimate_shapley(game, ShapleyConfig(budget=10), show_progress=False)
    with pytest.raises(InputError, match="needs 64 layer-evaluations but the budget is 63"):
        estimate_shapley(game, ShapleyConfig(estimator="exact", budget=63), show_progress=False)


@pytest.mark.parametrize("estimator", ["exact", "permutation", "local"])
def test_resume_after_interruption_gives_identical_values(estimator: str, tmp_path: Path) -> None:
    game = FunctionGame(list(WEIGHTS), _toy)
    config = ShapleyConfig(estimator=estimator, max_samples=120, round_size=8 if estimator == "local" else None, seed=5)
    if estimator == "exact":
        config = ShapleyConfig(estimator="exact", round_size=10)
    whole = estimate_shapley(game, config, show_progress=False)
    ckpt = tmp_path / "run.ckpt"

    class Killed(Exception):
        pass

    def kill_after_two(info) -> None:
        if info.round == 2:
            raise Killed

    with pytest.raises(Killed):
        estimate_shapley(game, config, checkpoint=ckpt, on_round=kill_after_two, show_progress=False)
    saved = json.loads(ckpt.read_text())
    assert saved["state"]["round"] == 2 and saved["identity"]["seed"] == config.seed
    with pytest.raises(CheckpointError, match="pass --resume"):
        estimate_shapley(game, config, checkpoint=ckpt, show_progress=False)
    with pytest.raises(CheckpointError, match="another seed"):
        estimate_shapley(game, ShapleyConfig(**{**config.to_dict(), "seed": 6}), checkpoint=ckpt, resume=True, show_progress=False)
    resumed = estimate_shapley(game, config, checkpoint=ckpt, resume=True, show_progress=False)
    assert resumed.values == whole.values and resumed.stderr == whole.stderr
    assert (resumed.samples, resumed.layer_evals, resumed.evaluations) == (whole.samples, whole.layer_evals, whole.evaluations)
    assert not ckpt.exists()


# --------------------------------------------------------------------------- model games


def _random_batches(n: int = 3, t: int = 12, seed: int = 0) -> TokenBatches:
    g = torch.Generator().manual_seed(seed)
    return pack(torch.randint(3, 300, (n * t * 2,), generator=g).tolist(), n, t, seed=seed)


@torch.no_grad()
def _direct_loss(model: torch.nn.Module, data: TokenBatches, masked: list[Unit]) -> float:
    with mask_units(model, masked):
        return -float(model(data.input_ids, labels=data.input_ids).loss)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_model_game_equals_direct_masking_and_cache_saves_work(family: str) -> None:
    model = tiny_model(family)
    data = _random_batches()
    layout = ModelLayout.of(model)
    units = all_units(layout.n_layers, ("attn", "mlp"))
    rng = np.random.default_rng(0)
    coalitions = [int(c) for c in rng.choice(1 << len(units), size=12, replace=False)] + [0, (1 << len(units)) - 1]
    cached = ModelGame(layout, make_value("loss", data), units, batch_size=2)
    plain = ModelGame(layout, make_value("loss", data), units, batch_size=2, cache=False)
    a_order, b_order = cached.order(coalitions), plain.order(coalitions)
    a = dict(zip(a_order, cached.evaluate(a_order)))
    b = dict(zip(b_order, plain.evaluate(b_order)))
    for c in coalitions:
        masked = [u for i, u in enumerate(units) if not c >> i & 1]
        assert a[c] == pytest.approx(_direct_loss(model, data, masked), rel=1e-5, abs=1e-6), (family, c)
        assert a[c] == pytest.approx(b[c], rel=1e-6, abs=1e-7)
    assert cached.layer_evals == cached.cost(a_order) < plain.layer_evals == plain.cost(b_order) == 14 * 4 * 3


def test_overlapping_players_are_refused() -> None:
    layout = ModelLayout.of(tiny_model("llama"))
    with pytest.raises(InputError, match="overlap"):
        ModelGame(layout, make_value("loss", _random_batches()), [Unit("block", 1), Unit("attn", 1)])


@pytest.fixture(scope="module")
def stories(stories_dir: Path, shared: Path):
    from depthprune.loading import load_model

    lm = load_model(str(stories_dir))
    data = load_calibration(shared / "data" / "tinystories" / "tinystories_sample.txt", lm.tokenizer, n_sequences=2, seq_len=32)
    return lm, data


@pytest.fixture(scope="module")
def stories_exact(stories):
    """Exact block and sublayer Shapley values of stories260K (loss value), with their costs."""
    lm, data = stories
    out = {}
    for kinds in (("block",), ("attn", "mlp")):
        units = all_units(5, kinds)
        out[kinds[0]] = shapley_units(lm.model, make_value("loss", data), units, ShapleyConfig(estimator="exact"), show_progress=False)
    return out


def test_stories_exact_cache_cost_and_efficiency(stories, stories_exact) -> None:
    lm, data = stories
    block = stories_exact["block"]
    # Lexicographic order over layer patterns: 2 + 4 + 8 + 16 + 32 layers per sequence.
    assert block.layer_evals == 2 * 62
    plain = shapley_units(lm.model, make_value("loss", data), all_units(5, ("block",)), ShapleyConfig(estimator="exact", cache=False), show_progress=False)
    assert plain.layer_evals == 2 * 32 * 5
    for p in block.players:
        assert plain.values[p] == pytest.approx(block.values[p], rel=1e-6, abs=1e-7)
    sub = stories_exact["attn"]
    assert len(sub.players) == 10 and sub.layer_evals < 2 * 1024 * 5 / 3.5
    for result in (block, sub):
        assert abs(result.efficiency_gap) < 1e-9
    assert block.v_full == pytest.approx(_direct_loss(lm.model, data, []), rel=1e-5)


@pytest.mark.parametrize("kind", ["block", "attn"])
def test_stories_permutation_agrees_with_exact(stories, stories_exact, kind: str) -> None:
    lm, data = stories
    exact = stories_exact[kind]
    units = all_units(5, ("block",) if kind == "block" else ("attn", "mlp"))
    config = ShapleyConfig(max_samples=40 if kind == "block" else 60, seed=3)
    result = shapley_units(lm.model, make_value("loss", data), units, config, show_progress=False)
    _within(result, exact.values)
    assert abs(result.efficiency_gap) < 1e-9
    assert result.layer_evals < exact.layer_evals * (1 if kind == "attn" else 10)


def test_stories_resume_with_model(stories, tmp_path: Path) -> None:
    lm, data = stories
    units = all_units(5, ("block",))
    config = ShapleyConfig(design="independent", max_samples=12, round_size=3, seed=9)
    whole = shapley_units(lm.model, make_value("loss", data), units, config, show_progress=False)

    def stop(info) -> None:
        if info.samples >= 6:
            raise KeyboardInterrupt

    ckpt = tmp_path / "scores.json.ckpt"
    with pytest.raises(KeyboardInterrupt):
        shapley_units(lm.model, make_value("loss", data), units, config, checkpoint=ckpt, on_round=stop, show_progress=False)
    resumed = shapley_units(lm.model, make_value("loss", data), units, config, checkpoint=ckpt, resume=True, show_progress=False)
    assert resumed.values == whole.values and resumed.stderr == whole.stderr and resumed.layer_evals == whole.layer_evals


# --------------------------------------------------------------------------- value functions


def test_kl_value_is_zero_at_full_and_matches_direct(stories) -> None:
    lm, data = stories
    layout = ModelLayout.of(lm.model)
    units = all_units(5, ("block",))
    game = ModelGame(layout, make_value("kl", data), units)
    full, some = game.full, 0b10110  # block.0 and block.3 masked
    values = dict(zip(game.order([full, some]), game.evaluate(game.order([full, some]))))
    assert values[full] == 0.0
    with torch.no_grad():
        ref = F.log_softmax(lm.model(data.input_ids).logits[:, :-1].double(), -1)
        with mask_units(lm.model, ["block.0", "block.3"]):
            logp = F.log_softmax(lm.model(data.input_ids).logits[:, :-1].double(), -1)
    assert values[some] == pytest.approx(-float((ref.exp() * (ref - logp)).sum(-1).mean()), rel=1e-5)


def test_multiple_choice_value_against_direct_letter_logits() -> None:
    model = tiny_model("llama")
    prompts = [[5, 9, 11, 40], [7, 7, 3], [100, 12, 13, 14, 15, 16], [8]]
    letters = [20, 21, 22, 23]
    answers = [0, 3, 1, 2]
    with torch.no_grad():
        rows = [model(torch.tensor([p])).logits[0, -1, letters] for p in prompts]
    scores = torch.stack(rows).double()
    want_loss = -float(F.cross_entropy(scores, torch.tensor(answers)))
    want_acc = float((scores.argmax(-1) == torch.tensor(answers)).double().mean())
    layout = ModelLayout.of(model)
    for metric, want in (("loss", want_loss), ("accuracy", want_acc)):
        value = MultipleChoiceValue(prompts, letters, answers, metric=metric)
        game = ModelGame(layout, value, all_units(4, ("block",)), batch_size=3)  # right padding inside batches
        assert game.evaluate([game.full])[0] == pytest.approx(want, rel=1e-5, abs=1e-6)
    # A continuation of two tokens (" ", "A") is scored by teacher forcing the shared " ".
    value = MultipleChoiceValue(prompts, [(30, 20), 21, (30, 22), (30, 23)], answers)
    with torch.no_grad():
        direct = []
        for p in prompts:
            logp = F.log_softmax(model(torch.tensor([p + [30]])).logits[0, -2:].double(), -1)
            direct.append([logp[0, 30] + logp[1, 20], logp[0, 21], logp[0, 30] + logp[1, 22], logp[0, 30] + logp[1, 23]])
    want = -float(F.cross_entropy(torch.tensor(direct), torch.tensor(answers)))
    game = ModelGame(layout, value, all_units(4, ("block",)), batch_size=2)
    assert game.evaluate([game.full])[0] == pytest.approx(want, rel=1e-5)
    with pytest.raises(InputError, match="differ before their last token"):
        MultipleChoiceValue(prompts, [(30, 20), (31, 21), 22, 23], answers)
    with pytest.raises(InputError, match="out of range"):
        MultipleChoiceValue(prompts, letters, [0, 4, 1, 2])


def test_mmlu_value_loads_through_the_evaluation_code(stories, shared: Path) -> None:
    lm, _ = stories
    config = ValueConfig("mmlu", mmlu=str(shared / "data" / "mmlu"), subjects=("anatomy",), limit=3, shots=1)
    value = make_value(config, tokenizer=lm.tokenizer, max_context=512)
    assert value.describe()["n_questions"] == 3 and value.name == "mmlu"
    result = shapley_units(lm.model, value, all_units(5, ("block",)), ShapleyConfig(estimator="exact"), show_progress=False)
    assert abs(result.efficiency_gap) < 1e-9 and all(math.isfinite(v) for v in result.values.values())
    with pytest.raises(InputError, match="--mmlu PATH"):
        ValueConfig("mmlu")
    with pytest.raises(InputError, match="Did you mean: loss"):
        ValueConfig("los")


# --------------------------------------------------------------------------- iterative pruning


def test_greedy_iterative_removes_least_loss_increase(stories, tmp_path: Path) -> None:
    lm, data = stories
    units = all_units(5, ("block",))
    result = iterative_prune(lm.model, make_value("loss", data), units, IterativeConfig(method="greedy", remove=2), show_progress=False)
    plan = result.to_plan()
    assert [e["rank"] for e in plan["remove"]] == [0, 1] and plan["n_layers"] == 5
    first = min(units, key=lambda u: -_direct_loss(lm.model, data, [u]))
    assert plan["remove"][0]["unit"] == str(first)
    removed = [Unit.parse(e["unit"]) for e in plan["remove"]]
    assert plan["remove"][1]["value"] == pytest.approx(_direct_loss(lm.model, data, removed), rel=1e-5)
    from depthprune.plan import plan_units

    assert [u for u, _ in plan_units(plan, 5)] == removed


def test_shapley_iterative_matches_exact_and_resumes(stories, stories_exact, tmp_path: Path) -> None:
    lm, data = stories
    units = all_units(5, ("block",))
    config = IterativeConfig(method="shapley", remove=2, shapley=ShapleyConfig(estimator="exact"))
    whole = iterative_prune(lm.model, make_value("loss", data), units, config, show_progress=False)
    assert whole.steps[0].unit == stories_exact["block"].ranking()[0]
    assert whole.steps[0].scores == pytest.approx(stories_exact["block"].values)
    assert whole.steps[1].value_before == pytest.approx(whole.steps[0].value_after)

    ckpt = tmp_path / "plan.json.ckpt"

    def stop(step) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        iterative_prune(lm.model, make_value("loss", data), units, config, checkpoint=ckpt, on_step=stop, show_progress=False)
    resumed = iterative_prune(lm.model, make_value("loss", data), units, config, checkpoint=ckpt, resume=True, show_progress=False)
    assert resumed.to_plan()["remove"] == whole.to_plan()["remove"]
    with pytest.raises(InputError, match="blocks or sublayers, not both"):
        iterative_prune(lm.model, make_value("loss", data), [Unit("block", 0), Unit("mlp", 1)], config, show_progress=False)
    with pytest.raises(InputError, match="at least one must stay"):
        iterative_prune(lm.model, make_value("loss", data), units, IterativeConfig(remove=5), show_progress=False)


# --------------------------------------------------------------------------- score() and the CLI


def test_score_dispatches_shapley(stories, stories_exact) -> None:
    lm, data = stories
    config = ScoreConfig(metrics=("shapley", "loo_loss"), units=("block",), shapley=ShapleyConfig(estimator="exact"), show_progress=False)
    result = score(lm.model, data, config)
    assert result.scores["shapley"] == pytest.approx({str(u): v for u, v in stories_exact["block"].values.items()})
    assert result.stderr["shapley"] == {f"block.{i}": 0.0 for i in range(5)}
    definition = result.definitions["shapley"]
    assert definition["estimator"] == "exact" and definition["value"] == "loss"
    assert result.cost["shapley_block_layer_evals"] == stories_exact["block"].layer_evals
    with pytest.raises(InputError, match="Did you mean: local"):
        ScoreConfig(metrics=("shapley",), shapley=ShapleyConfig(estimator="locl"))
    with pytest.raises(InputError, match="expected a ShapleyConfig"):
        ScoreConfig(metrics=("shapley",), shapley={"estimator": "exact"})  # type: ignore[arg-type]


def test_score_dispatches_adaptive_metrics_through_their_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """score() calls an adaptive metric's own compute, once for all metrics that share it."""
    from depthprune.score.registry import METRICS, Metric, MetricTables

    calls = []

    def depth(request, metrics) -> MetricTables:
        calls.append([m.name for m in metrics])
        table = {m.name: {str(u): float(u.index + k) for u in request.units} for k, m in enumerate(metrics)}
        return MetricTables(table, {m: dict.fromkeys(t) for m, t in table.items()}, {"depth_layer_evals": 7})

    for name in ("depth_a", "depth_b"):
        monkeypatch.setitem(METRICS._entries, name, Metric(name, "adaptive", "a test metric", "none", compute=depth))
    model = tiny_model("llama")
    result = score(model, _random_batches(), ScoreConfig(metrics=("depth_b", "cosine", "depth_a"), units=("block",), show_progress=False))
    assert calls == [["depth_b", "depth_a"]]
    assert list(result.scores) == ["depth_b", "cosine", "depth_a"]
    assert result.scores["depth_a"] == {f"block.{i}": float(i + 1) for i in range(4)}
    assert result.cost["depth_layer_evals"] == 7 and result.definitions["depth_a"]["definition"] == "a test metric"


def test_cli_register_builds_parsers() -> None:
    from depthprune.commands.shapley import register

    parser = argparse.ArgumentParser(prog="depthprune")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shapley", "m", "--data", "d.txt", "--units", "attn,mlp", "--estimator", "exact", "--budget", "100", "--tol", "0.01", "--resume", "-o", "s.json"])
    assert (args.estimator, args.budget, args.tol, args.resume, args.units) == ("exact", 100, 0.01, True, "attn,mlp")
    assert callable(args.func)
    args = parser.parse_args(["iterative", "m", "--data", "d.txt", "--method", "greedy", "--remove", "2", "-o", "p.json"])
    assert args.method == "greedy" and args.remove == "2" and callable(args.func)


def test_cli_writes_scores_and_plan(stories_dir: Path, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from depthprune.cli import main

    text = str(shared / "data" / "tinystories" / "tinystories_sample.txt")
    common = [str(stories_dir), "--data", text, "--samples", "2", "--seq-len", "16", "-q"]
    out = tmp_path / "scores.json"
    assert main(["shapley", *common, "--units", "attn,mlp", "--max-samples", "20", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["scores"]["shapley"]) == {str(u) for u in all_units(5, ("attn", "mlp"))}
    assert all(v is not None and v >= 0 for v in doc["stderr"]["shapley"].values())
    assert doc["definitions"]["shapley"]["estimator"] == "permutation" and not Path(f"{out}.ckpt").exists()
    plan = tmp_path / "plan.json"
    assert main(["iterative", *common, "--method", "greedy", "--remove", "1", "-o", str(plan)]) == 0
    assert json.loads(plan.read_text())["remove"][0]["replace"] == "none"
    assert main(["shapley", *common, "--estimator", "exct", "-o", str(tmp_path / "x.json")]) == 2
    assert "Did you mean: exact" in capsys.readouterr().err
    assert main(["shapley", *common, "--units", "block", "-o", str(out)]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["iterative", *common, "--units", "attn,block", "--remove", "1", "-o", str(tmp_path / "p2.json")]) == 2
    assert "not both" in capsys.readouterr().err
