"""Shapley values of units: exact enumeration, antithetic permutation sampling, local sampling.

The players are units (``block.i``, or ``attn.i``/``mlp.i``); a coalition is the set of
units that are present, and every other player is masked.

- :mod:`~depthprune.score.shapley.games`: the games (:class:`Game`, :class:`FunctionGame`,
  :class:`ModelGame`) and their prefix cache;
- :mod:`~depthprune.score.shapley.estimators`: the estimators and their registry
  ``ESTIMATORS``; :mod:`~depthprune.score.shapley.states`: their typed states and
  checkpoint JSON;
- :mod:`~depthprune.score.shapley.config`: :class:`ShapleyConfig`;
- :mod:`~depthprune.score.shapley.driver`: the run loop, budgets, checkpoints and resume
  (:func:`estimate_shapley`), and the model entry points (:func:`shapley_units`,
  :func:`unit_games`);
- :mod:`~depthprune.score.shapley.metric`: the ``shapley`` metric of ``score``.
"""

from __future__ import annotations

from depthprune.score.shapley.config import ShapleyConfig
from depthprune.score.shapley.driver import (
    RoundInfo,
    ShapleyResult,
    estimate_shapley,
    shapley_units,
    unit_games,
)
from depthprune.score.shapley.estimators import (
    DESIGNS,
    ESTIMATORS,
    MAX_EXACT_PLAYERS,
    Estimator,
    EstimatorSpec,
    exact_shapley,
    get_estimator,
    register_estimator,
)
from depthprune.score.shapley.games import FunctionGame, Game, ModelGame

__all__ = [
    "DESIGNS",
    "ESTIMATORS",
    "MAX_EXACT_PLAYERS",
    "Estimator",
    "EstimatorSpec",
    "FunctionGame",
    "Game",
    "ModelGame",
    "RoundInfo",
    "ShapleyConfig",
    "ShapleyResult",
    "estimate_shapley",
    "exact_shapley",
    "get_estimator",
    "register_estimator",
    "shapley_units",
    "unit_games",
]
