"""Shapley values: known answers on toy games, agreement with exact values on stories260K,
prefix caching, budgets, resume, value functions, iterative pruning and the CLI.

Sampled estimates are checked with ``_within``: every estimate within 4 standard errors
of the truth *and* every standard error below a bound derived from the truth's gaps, so
that no wrong order can pass (an unbounded error lets any answer through).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
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
    Game,
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


def _by_definition(players: Sequence[Hashable], fn: Callable[[frozenset], float]) -> dict[Hashable, float]:
    """Shapley values straight from the definition: the mean marginal contribution over
    all n! orders (an oracle independent of the library; small n only)."""
    total = dict.fromkeys(players, 0.0)
    orders = list(itertools.permutations(players))
    for order in orders:
        before: frozenset = frozenset()
        for p in order:
            total[p] += fn(before | {p}) - fn(before)
            before = before | {p}
    return {p: t / len(orders) for p, t in total.items()}


def _resolving_bound(truth: dict, boundaries: Sequence[int] | None = None) -> float:
    """The largest standard error at which 4-sigma agreement still fixes the order.

    If every estimate is within ``4 * se`` of the truth and ``se <= gap / 8``, no estimate
    moves more than half the gap, so two true values ``gap`` apart cannot swap. The gap
    is the smallest between consecutive sorted true values, or only at the given
    ``boundaries`` (``k``: between the k-th and (k+1)-th least important), when only
    the least important ``k`` units must be right.
    """
    s = sorted(truth.values())
    ks = boundaries if boundaries is not None else range(1, len(s))
    return min(s[k] - s[k - 1] for k in ks) / 8


def _within(result, truth: dict, bound: float) -> None:
    for p, want in truth.items():
        err = result.stderr[p]
        assert err <= bound, (p, err, bound)
        assert abs(result.values[p] - want) <= 4 * err + 1e-9, (p, result.values[p], want, err)


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))  # no ties in these tests
    return float(np.corrcoef(ra, rb)[0, 1])


# --------------------------------------------------------------------------- toy games


def test_exact_recovers_known_values_and_efficiency() -> None:
    game = FunctionGame(list(WEIGHTS), _toy)
    result = estimate_shapley(game, ShapleyConfig(estimator="exact"), show_progress=False)
    assert _by_definition(list(WEIGHTS), _toy) == pytest.approx(KNOWN, abs=1e-12)  # the hand-made answer is right
    for p, want in KNOWN.items():
        assert result.values[p] == pytest.approx(want, abs=1e-12)
        assert result.stderr[p] == 0.0
    # Efficiency checks the weights of the Shapley formula (each player's sum is separate).
    assert result.v_full - result.v_empty == pytest.approx(sum(KNOWN.values()))
    assert abs(result.efficiency_gap) < 1e-12
    assert result.evaluations == 64 and result.stopped == "complete" and not result.sampled


def test_exact_on_games_with_published_values() -> None:
    # Glove game: one left glove, two right ones; a pair is worth 1. Values (2/3, 1/6, 1/6).
    glove = FunctionGame(["L", "R1", "R2"], lambda s: float(min(len(s & {"L"}), len(s & {"R1", "R2"}))))
    result = estimate_shapley(glove, ShapleyConfig(estimator="exact"), show_progress=False)
    assert result.values == pytest.approx({"L": 2 / 3, "R1": 1 / 6, "R2": 1 / 6}, abs=1e-12)
    # Weighted majority [51; 40, 30, 20, 10] (Shapley-Shubik index): of the 24 orders, 40
    # is pivotal in 10, 30 and 20 in 6 each, 10 in 2: (5/12, 1/4, 1/4, 1/12).
    weights = {"w40": 40, "w30": 30, "w20": 20, "w10": 10}

    def majority(s: frozenset) -> float:
        return float(sum(weights[p] for p in s) >= 51)

    result = estimate_shapley(FunctionGame(list(weights), majority), ShapleyConfig(estimator="exact"), show_progress=False)
    assert result.values == pytest.approx(_by_definition(list(weights), majority), abs=1e-12)
    assert result.values == pytest.approx({"w40": 5 / 12, "w30": 1 / 4, "w20": 1 / 4, "w10": 1 / 12}, abs=1e-12)


def test_axioms_null_player_symmetry_and_relabelling() -> None:
    """Exact values obey the axioms, and follow the players when they are reordered
    (a mix-up between player index and coalition bit would break both)."""

    def game(s: frozenset) -> float:  # x and y symmetric, z null, w a dummy worth 0.3
        return 2.0 * (("x" in s) and ("y" in s)) + 1.0 * (("x" in s) or ("y" in s)) + 0.3 * ("w" in s) + 5.0 * ({"x", "v"} <= s)

    players = ["x", "y", "z", "w", "v"]
    truth = _by_definition(players, game)
    for order in (players, players[::-1], ["z", "v", "x", "w", "y"]):
        exact = estimate_shapley(FunctionGame(order, game), ShapleyConfig(estimator="exact"), show_progress=False)
        assert exact.values == pytest.approx(truth, abs=1e-12)
        assert exact.values["z"] == 0.0 and exact.values["w"] == pytest.approx(0.3, abs=1e-12)
    sym = FunctionGame(["x", "y", "z", "w"], lambda s: game(s - {"v"}))
    exact = estimate_shapley(sym, ShapleyConfig(estimator="exact"), show_progress=False)
    assert exact.values["x"] == pytest.approx(exact.values["y"], abs=1e-12)
    assert exact.values["x"] == pytest.approx(1.5, abs=1e-12) and exact.values["z"] == 0.0
    # Every marginal contribution of a null player is 0 and of a dummy its weight, so
    # sampling must give them exactly, whatever the seed and design.
    for design in ("cyclic", "independent"):
        for seed in range(3):
            result = estimate_shapley(FunctionGame(players, game), ShapleyConfig(design=design, max_samples=20, seed=seed), show_progress=False)
            assert result.values["z"] == 0.0 and result.stderr["z"] == 0.0
            assert result.values["w"] == pytest.approx(0.3, abs=1e-12) and result.stderr["w"] < 1e-6  # rounding only


@pytest.mark.parametrize(("design", "samples"), [("cyclic", 2400), ("independent", 3000)])
def test_permutation_recovers_known_values_within_bounded_error(design: str, samples: int) -> None:
    game = FunctionGame(list(WEIGHTS), _toy)
    result = estimate_shapley(game, ShapleyConfig(design=design, max_samples=samples, seed=1), show_progress=False)
    # The closest true values are 0.25 apart (d, a and e): se <= 0.031 keeps every pair in order.
    _within(result, KNOWN, _resolving_bound(KNOWN))
    assert result.ranking() == sorted(KNOWN, key=KNOWN.get)
    assert result.stderr["b"] > 0  # the three-way interaction makes b noisy: the check above is not vacuous


@pytest.mark.parametrize("design", ["cyclic", "independent"])
def test_antithetic_pairs_are_exact_for_additive_games(design: str) -> None:
    result = estimate_shapley(FunctionGame(list(WEIGHTS), _additive), ShapleyConfig(design=design, max_samples=12), show_progress=False)
    for p, w in WEIGHTS.items():
        assert result.values[p] == pytest.approx(w, abs=1e-12) and result.stderr[p] < 1e-6


def test_independent_antithetic_pairs_are_exact_for_pairwise_games() -> None:
    pairwise = FunctionGame(list(WEIGHTS), lambda s: _additive(s) + (3.0 if {"a", "c"} <= s else 0.0))
    result = estimate_shapley(pairwise, ShapleyConfig(design="independent", max_samples=5), show_progress=False)
    for p in WEIGHTS:
        want = WEIGHTS[p] + (1.5 if p in "ac" else 0.0)
        assert result.values[p] == pytest.approx(want, abs=1e-12) and result.stderr[p] == pytest.approx(0.0, abs=1e-12)


def _security_council() -> tuple[list[str], Callable[[frozenset], float], dict[str, float]]:
    """The UN Security Council as a simple game: a resolution passes with all 5 permanent
    members and at least 9 of the 15 votes (Shapley and Shubik 1954). A non-permanent
    member is pivotal when the 8 before it are the 5 permanent members and 3 of the other
    9: phi = C(9,3) 8! 6! / 15! = 0.001865; a permanent member gets (1 - 10 phi) / 5 =
    0.19627 (the published 0.1963 and 0.0019)."""
    permanent = [f"P{i}" for i in range(5)]
    others = [f"N{i}" for i in range(10)]
    players = [p for pair in zip(others, permanent) for p in pair] + others[5:]  # interleaved
    phi_n = math.comb(9, 3) * math.factorial(8) * math.factorial(6) / math.factorial(15)
    truth = {p: (1 - 10 * phi_n) / 5 if p in permanent else phi_n for p in players}

    def passes(s: frozenset) -> float:
        return float(len(s) >= 9 and all(p in s for p in permanent))

    return players, passes, truth


@pytest.mark.parametrize("design", ["cyclic", "independent"])
def test_permutation_on_a_game_too_large_for_exact(design: str) -> None:
    players, passes, truth = _security_council()
    game = FunctionGame(players, passes)
    with pytest.raises(InputError, match="at most 12 players"):
        estimate_shapley(game, ShapleyConfig(estimator="exact"), show_progress=False)
    result = estimate_shapley(game, ShapleyConfig(design=design, max_samples=1500, seed=0), show_progress=False)
    permanent = {p: v for p, v in truth.items() if p.startswith("P")}
    # Permanent and non-permanent members are 0.194 apart: se <= 0.024 keeps them apart.
    _within(result, permanent, (truth["P0"] - truth["N0"]) / 8)
    assert set(result.ranking()[-5:]) == set(permanent)
    # A non-permanent member is pivotal in few samples, so its own standard error is
    # unreliable; its value is checked against an absolute tolerance instead.
    assert all(abs(result.values[p] - truth[p]) < 0.01 for p in players if p.startswith("N"))


def test_local_recovers_additive_values() -> None:
    game = FunctionGame(list(WEIGHTS), _additive)
    result = estimate_shapley(game, ShapleyConfig(estimator="local", local_k=2, max_samples=4000, seed=2), show_progress=False)
    _within(result, WEIGHTS, _resolving_bound(WEIGHTS))  # closest weights 0.25 apart
    # The paper's raw number, mean present - mean absent, is (n w_i - W) / (n - 1) in expectation.
    n, total = len(WEIGHTS), sum(WEIGHTS.values())
    raw = result.details["present_minus_absent"]
    raw_err = result.details["present_minus_absent_stderr"]
    for p, w in WEIGHTS.items():
        assert raw_err[p] <= 0.25 / 8 * n / (n - 1)
        assert raw[p] == pytest.approx((n * w - total) / (n - 1), abs=4 * raw_err[p])


def test_local_is_not_the_shapley_value_with_interactions() -> None:
    """Local sampling only sees coalitions near the full model: on the toy game it ranks
    the three-way players b, d, e above a, unlike the Shapley values (documented)."""
    game = FunctionGame(list(WEIGHTS), _toy)
    result = estimate_shapley(game, ShapleyConfig(estimator="local", local_k=1, max_samples=600, seed=0), show_progress=False)
    assert min(result.values[p] for p in "bde") > result.values["a"] and KNOWN["a"] > KNOWN["b"]


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
    assert result.stopped == "tol" and max(result.stderr.values()) < 0.2 and result.samples >= 4 * 6
    with pytest.raises(InputError, match="too small for one sample.*independent design"):
        estimate_shapley(game, ShapleyConfig(budget=10), show_progress=False)
    with pytest.raises(InputError, match="needs 64 layer-evaluations but the budget is 63"):
        estimate_shapley(game, ShapleyConfig(estimator="exact", budget=63), show_progress=False)


@pytest.mark.parametrize("estimator", ["exact", "cyclic", "independent", "local"])
def test_resume_after_interruption_gives_identical_values(estimator: str, tmp_path: Path) -> None:
    game = FunctionGame(list(WEIGHTS), _toy)
    configs = {
        "exact": ShapleyConfig(estimator="exact", round_size=10),
        "cyclic": ShapleyConfig(max_samples=120, seed=5),
        "independent": ShapleyConfig(design="independent", max_samples=120, seed=5),
        "local": ShapleyConfig(estimator="local", max_samples=120, round_size=8, seed=5),
    }
    config = configs[estimator]
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


def test_checkpoint_of_the_old_cyclic_standard_error_is_refused(tmp_path: Path) -> None:
    game = FunctionGame(list(WEIGHTS), _toy)
    config = ShapleyConfig(max_samples=60, seed=5)
    ckpt = tmp_path / "run.ckpt"

    def stop(info) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        estimate_shapley(game, config, checkpoint=ckpt, on_round=stop, show_progress=False)
    doc = json.loads(ckpt.read_text())
    del doc["state"]["est"]["rounds"]  # what the per-position formula saved
    ckpt.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="older depthprune"):
        estimate_shapley(game, config, checkpoint=ckpt, resume=True, show_progress=False)


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


class _Recorded(Game):
    """A game that records the value of every coalition its inner game evaluates."""

    def __init__(self, inner: Game) -> None:
        self.inner, self.players, self.table = inner, inner.players, {}

    def order(self, coalitions):
        return self.inner.order(coalitions)

    def cost(self, ordered):
        return self.inner.cost(ordered)

    def setup_cost(self):
        return self.inner.setup_cost()

    def evaluate(self, ordered):
        values = self.inner.evaluate(ordered)
        self.table.update(zip(ordered, values))
        return values

    def identity(self):
        return self.inner.identity()


def _table_game(players: Sequence[Unit], table: dict[int, float]) -> FunctionGame:
    """The same game from a table of every coalition's value: sampling it costs no forward pass."""
    bit = {u: 1 << i for i, u in enumerate(players)}
    return FunctionGame(players, lambda present: table[sum(bit[u] for u in present)], name="table")


@pytest.fixture(scope="module")
def stories(stories_dir: Path, shared: Path):
    from depthprune.loading import load_model

    lm = load_model(str(stories_dir))
    data = load_calibration(shared / "data" / "tinystories" / "tinystories_sample.txt", lm.tokenizer, n_sequences=2, seq_len=32)
    return lm, data


@pytest.fixture(scope="module")
def stories_games(stories):
    """stories260K's block and sublayer games (loss value): exact Shapley values, with
    their cost, and every coalition's value."""
    lm, data = stories
    layout = ModelLayout.of(lm.model)
    out = {}
    for kind, kinds in (("block", ("block",)), ("sublayer", ("attn", "mlp"))):
        game = _Recorded(ModelGame(layout, make_value("loss", data), all_units(5, kinds)))
        out[kind] = (estimate_shapley(game, ShapleyConfig(estimator="exact"), show_progress=False), game.table)
    return out


@pytest.fixture(scope="module")
def stories_exact(stories_games):
    return {kind: result for kind, (result, _) in stories_games.items()}


def test_stories_exact_cache_cost_and_efficiency(stories, stories_exact) -> None:
    lm, data = stories
    block = stories_exact["block"]
    # Lexicographic order over layer patterns: 2 + 4 + 8 + 16 + 32 layers per sequence.
    assert block.layer_evals == 2 * 62
    plain = shapley_units(lm.model, make_value("loss", data), all_units(5, ("block",)), ShapleyConfig(estimator="exact", cache=False), show_progress=False)
    assert plain.layer_evals == 2 * 32 * 5
    for p in block.players:
        assert plain.values[p] == pytest.approx(block.values[p], rel=1e-6, abs=1e-7)
    sub = stories_exact["sublayer"]
    # 4 + 16 + 64 + 256 + 1024 distinct (layer, prefix) states per sequence, plus 4 layers
    # that the first coalition of each later chunk of 256 (one checkpoint each) cannot
    # take from the chunk before it.
    assert len(sub.players) == 10 and sub.layer_evals == 2 * (1364 + 4)
    for result in (block, sub):
        assert abs(result.efficiency_gap) < 1e-9
    assert block.v_full == pytest.approx(_direct_loss(lm.model, data, []), rel=1e-5)


@pytest.mark.parametrize(("kind", "samples", "boundaries", "min_spearman"), [("block", 1000, (1, 2, 4), 0.9), ("sublayer", 1500, (2, 6), 0.95)])
def test_stories_permutation_ranks_match_exact(stories_games, kind: str, samples: int, boundaries: tuple[int, ...], min_spearman: float) -> None:
    """The default estimator on stories260K's own game (sampled from its table of values).

    The standard errors must be small enough (gap / 8) that 4-sigma agreement pins the
    least important 1, 2 and 4 blocks, or 2 and 6 sublayers, which is what pruning
    uses; then the ranking must agree (Spearman), and those sets must equal exact's.
    With 5 blocks a Spearman of 0.9 allows one swap of neighbours (block.4 and block.1 are
    0.10 apart); with 10 sublayers 0.95 allows about three.
    """
    exact, table = stories_games[kind]
    game = _table_game(exact.players, table)
    result = estimate_shapley(game, ShapleyConfig(max_samples=samples, seed=3), show_progress=False)
    _within(result, exact.values, _resolving_bound(exact.values, boundaries))
    players = list(exact.players)
    assert _spearman([result.values[p] for p in players], [exact.values[p] for p in players]) >= min_spearman
    for k in boundaries:
        assert set(result.ranking()[:k]) == set(exact.ranking()[:k]), k


def test_stories_sampling_the_model_equals_sampling_its_table(stories, stories_games) -> None:
    """Cached and uncached model games give the estimator the same values as the table
    (so the table test above is about this model), and caching costs less."""
    lm, data = stories
    exact, table = stories_games["sublayer"]
    units = list(exact.players)
    config = ShapleyConfig(max_samples=20, seed=3)  # two cyclic rounds
    cached = shapley_units(lm.model, make_value("loss", data), units, config, show_progress=False)
    plain = shapley_units(lm.model, make_value("loss", data), units, replace(config, cache=False), show_progress=False)
    tabled = estimate_shapley(_table_game(units, table), config, show_progress=False)
    for p in units:
        assert cached.values[p] == pytest.approx(tabled.values[p], abs=1e-9)
        assert plain.values[p] == pytest.approx(tabled.values[p], abs=1e-6)
    assert cached.evaluations == plain.evaluations == tabled.evaluations
    assert cached.layer_evals < plain.layer_evals == 5 * 2 * plain.evaluations
    assert cached.layer_evals < exact.layer_evals


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
    from depthprune.commands.shapley import register, run_iterative, run_shapley

    parser = argparse.ArgumentParser(prog="depthprune")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shapley", "m", "--data", "d.txt", "--units", "attn,mlp", "--estimator", "exact", "--budget", "100", "--tol", "0.01", "--resume", "-o", "s.json"])
    assert (args.estimator, args.budget, args.tol, args.resume, args.units) == ("exact", 100, 0.01, True, "attn,mlp")
    assert args.func is run_shapley
    args = parser.parse_args(["iterative", "m", "--data", "d.txt", "--method", "greedy", "--remove", "2", "-o", "p.json"])
    assert args.method == "greedy" and args.remove == "2" and args.func is run_iterative


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
