"""The ``shapley`` metric of ``score``: one game per granularity, merged into score tables."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from depthprune.score.registry import AdaptiveRequest, Metric, MetricTables
from depthprune.score.shapley.driver import (
    ShapleyResult,
    estimate_shapley,
    shapley_units,
    unit_games,
)
from depthprune.score.shapley.estimators import get_estimator
from depthprune.score.shapley.games import Game
from depthprune.score.values import ValueFunction, make_value
from depthprune.units import UNIT_KINDS, Unit


def shapley_tables(results: Iterable[ShapleyResult[Unit]]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Scores and standard errors of Shapley results, merged and in unit order."""
    values: dict[Unit, tuple[float, float]] = {}
    for res in results:
        for u in res.players:
            values[u] = (res.values[u], res.stderr[u])
    order = sorted(values, key=lambda u: (u.index, UNIT_KINDS.index(u.kind)))

    def clean(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {str(u): clean(values[u][0]) for u in order}, {str(u): clean(values[u][1]) for u in order}


def shapley_definition(metric: Metric, results: dict[str, ShapleyResult[Unit]]) -> dict[str, Any]:
    """The ``definitions`` entry of the ``shapley`` metric: estimator, value and each game's run."""
    first = next(iter(results.values()))
    value = first.game.get("value", {})
    est = get_estimator(first.estimator)
    games = {}
    for name, res in results.items():
        doc = res.to_dict()
        keys = ("players", "v_full", "v_empty", "efficiency_gap", "samples", "layer_evals", "evaluations", "stopped", "details")
        games[name] = {k: doc[k] for k in keys}
    return {
        "definition": metric.definition,
        "reference": metric.reference,
        "kind": metric.kind,
        "stderr": first.note,
        "estimator": first.estimator,
        "estimator_definition": est.description,
        "estimator_reference": est.reference,
        "value": value.get("value"),
        "value_definition": value.get("definition"),
        "value_inputs": value,
        "settings": first.config.to_dict(),
        "games": games,
    }


def compute_shapley(
    request: AdaptiveRequest,
    metrics: Sequence[Metric],
    game_of: Callable[[ValueFunction, list[Unit]], Game[Unit]] | None = None,
) -> MetricTables:
    """Shapley values of every game the requested unit kinds make (``block``, ``sublayer``).

    Args:
        request: The model, data and settings.
        metrics: The ``shapley`` metric.
        game_of: Builds the game of a value function and players (a layer-streamed game);
            default: the in-memory :class:`~depthprune.score.shapley.games.ModelGame`.
    """
    from depthprune.data import context_length

    config, layout = request.config, request.layout
    value = make_value(config.value, request.data, request.tokenizer, context_length(layout.model))
    games = unit_games(layout.n_layers, config.units)
    results = {}
    for name, players in games.items():
        checkpoint = config.checkpoint
        if checkpoint is not None and len(games) > 1:
            checkpoint = f"{checkpoint}.{name}"
        run = {"checkpoint": checkpoint, "resume": config.resume, "show_progress": config.show_progress}
        if game_of is None:
            results[name] = shapley_units(layout, value, players, config.shapley, **run)  # type: ignore[arg-type]
        else:
            results[name] = estimate_shapley(game_of(value, players), config.shapley, **run)  # type: ignore[arg-type]
    (metric,) = metrics
    scores, stderr = shapley_tables(results.values())
    return MetricTables(
        scores={metric.name: scores},
        stderr={metric.name: stderr},
        cost={f"shapley_{name}_layer_evals": res.layer_evals for name, res in results.items()},
        definitions={metric.name: shapley_definition(metric, results)},
    )


__all__ = ["compute_shapley", "shapley_definition", "shapley_tables"]
