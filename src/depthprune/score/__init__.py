"""The ``score`` stage: how much each unit matters, by every registered metric.

In every result a higher score means more important.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from depthprune import __version__
from depthprune._fs import write_json_atomic
from depthprune.architectures import ArchSpec
from depthprune.data import CalibrationInfo, TokenBatches
from depthprune.errors import InputError
from depthprune.score.adaptive import leave_one_out
from depthprune.score.registry import METRICS, Metric, get_metric, parse_metrics
from depthprune.score.shapley import ShapleyConfig, ShapleyResult, shapley_units, unit_games
from depthprune.score.static import RunningStats, collect_static
from depthprune.score.values import ValueConfig, make_value
from depthprune.units import UNIT_KINDS, ModelLayout, Unit, all_units

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "ScoreConfig", "ScoreResult", "get_metric", "score", "shapley_definition", "shapley_tables", "write_scores"]

DEFAULT_METRICS = ("cosine", "angular", "rel_l1", "rel_l2")


@dataclass(frozen=True)
class ScoreConfig:
    """What to score and how.

    Attributes:
        metrics: Registered metric names (see ``depthprune.score.METRICS``).
        units: Unit kinds to score: any of ``block``, ``attn``, ``mlp``.
        last_token_only: Static metrics use only each sequence's last token.
        span: Blocks per span for ``angular_span``.
        batch_size: Sequences per forward pass.
        seed: Recorded with the result (the calibration windows are drawn with it); also
            seeds the ``shapley`` sampling.
        show_progress: Show progress bars on a terminal.
        estimator: ``shapley``: ``exact``, ``permutation`` or ``local``.
        value: ``shapley``: the value function, ``loss``, ``kl`` or ``mmlu``.
        budget: ``shapley``: most layer-evaluations per game (blocks, sublayers).
        tol: ``shapley``: stop once every standard error is below this.
        max_samples: ``shapley``: most permutation pairs (or local coalitions) per game.
        local_k: ``shapley`` with ``local``: units removed per sampled coalition.
        design: ``shapley`` with ``permutation``: ``cyclic`` (stratified) or ``independent``.
        checkpoint: ``shapley``: save progress to this JSON file (``.block``/``.sublayer``
            appended when both games run).
        resume: ``shapley``: continue from ``checkpoint``.
        mmlu: ``shapley`` with the ``mmlu`` value: the MMLU data folder.
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    units: tuple[str, ...] = UNIT_KINDS
    last_token_only: bool = False
    span: int = 1
    batch_size: int = 8
    seed: int = 0
    show_progress: bool = True
    estimator: str = "permutation"
    value: str = "loss"
    budget: int | None = None
    tol: float | None = None
    max_samples: int | None = None
    local_k: int | None = None
    design: str = "cyclic"
    checkpoint: str | None = None
    resume: bool = False
    mmlu: str | None = None

    def __post_init__(self) -> None:
        parse_metrics(list(self.metrics))
        if "shapley" in self.metrics:
            self.shapley_config()
            self.value_config()
        if not self.units:
            raise InputError("no unit kinds given; expected any of block,attn,mlp")
        all_units(1, self.units)  # validates the kinds
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if self.span < 1:
            raise InputError(f"span must be at least 1, got {self.span}")
        if "angular_span" in self.metrics and "block" not in self.units:
            raise InputError("angular_span scores spans of blocks; add 'block' to the unit kinds")

    def shapley_config(self) -> ShapleyConfig:
        """The settings of the ``shapley`` metric's estimator."""
        return ShapleyConfig(
            estimator=self.estimator,
            tol=self.tol,
            budget=self.budget,
            max_samples=self.max_samples,
            local_k=self.local_k,
            design=self.design,  # type: ignore[arg-type]
            seed=self.seed,
            batch_size=self.batch_size,
        )

    def value_config(self) -> ValueConfig:
        """The ``shapley`` metric's value function."""
        return ValueConfig(self.value, mmlu=self.mmlu)


@dataclass
class ScoreResult:
    """Scores of every unit by every metric, with standard errors and provenance."""

    model: str
    family: str
    n_layers: int
    calibration: CalibrationInfo
    scores: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]]
    definitions: dict[str, dict[str, Any]]
    seed: int
    cost: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``scores.json`` document."""
        return {
            "model": self.model,
            "family": self.family,
            "n_layers": self.n_layers,
            "calibration": self.calibration.to_dict(),
            "scores": self.scores,
            "stderr": self.stderr,
            "definitions": self.definitions,
            "meta": {
                "version": __version__,
                "seed": self.seed,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "cost": self.cost,
            },
        }

    def ranking(self, metric: str) -> list[str]:
        """Units by ``metric``, least important first."""
        values = self.scores[metric]
        return sorted(values, key=lambda u: (values[u], Unit.parse(u).index))


def _definition(metric: Metric, config: ScoreConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"definition": metric.definition, "reference": metric.reference, "kind": metric.kind}
    if metric.kind == "static":
        out["tokens"] = "last token of each sequence" if config.last_token_only else "all non-padding tokens"
        out["stderr"] = "over tokens"
    else:
        out["stderr"] = "over sequences"
    if metric.name == "angular_span":
        out["span"] = config.span
    return out


def _table(stats: dict[tuple[str, Unit], RunningStats], metric: str) -> tuple[dict[str, float], dict[str, float]]:
    items = sorted(((u, s) for (m, u), s in stats.items() if m == metric), key=lambda us: (us[0].index, UNIT_KINDS.index(us[0].kind)))
    return {str(u): s.mean for u, s in items}, {str(u): (s.stderr if math.isfinite(s.stderr) else None) for u, s in items}  # type: ignore[misc]


def score(
    model: nn.Module,
    data: TokenBatches,
    config: ScoreConfig | None = None,
    spec: ArchSpec | None = None,
    model_name: str = "",
    *,
    tokenizer: Any | None = None,
) -> ScoreResult:
    """Score every unit of ``model`` on calibration ``data``.

    All static metrics of all units come from one forward pass; leave-one-out metrics
    mask units one at a time and reuse the hidden states before them; ``shapley`` plays
    one game per granularity (blocks; attention and MLP sublayers together).

    Args:
        model: A Hugging Face causal LM of a supported family, in eval mode.
        data: Packed calibration tokens.
        config: Metrics, unit kinds and options; defaults to all static metrics of all units.
        spec: The family spec, looked up when omitted.
        model_name: Recorded in the result.
        tokenizer: The model's tokenizer; needed only by the ``mmlu`` Shapley value.

    Returns:
        A :class:`ScoreResult`.
    """
    config = config or ScoreConfig()
    layout = ModelLayout.of(model, spec)
    metrics = parse_metrics(list(config.metrics))
    units = all_units(layout.n_layers, config.units)
    stats: dict[tuple[str, Unit], RunningStats] = {}
    cost: dict[str, int] = {}
    static = [m for m in metrics if m.kind == "static"]
    if static:
        stats.update(
            collect_static(
                layout,
                data,
                units,
                static,
                batch_size=config.batch_size,
                last_token_only=config.last_token_only,
                span=config.span,
                show_progress=config.show_progress,
            )
        )
        cost["static_layer_evals"] = layout.n_layers * len(data)
    loo = [m.name for m in metrics if m.name in ("loo_loss", "loo_kl")]
    if loo:
        loo_stats, evals = leave_one_out(
            layout, data, units, loo, batch_size=config.batch_size, show_progress=config.show_progress
        )
        stats.update(loo_stats)
        cost["loo_layer_evals"] = evals
    shapley: dict[str, ShapleyResult] = {}
    if any(m.name == "shapley" for m in metrics):
        shapley = _shapley(layout, data, config, tokenizer)
        for name, res in shapley.items():
            cost[f"shapley_{name}_layer_evals"] = res.layer_evals
    unknown = [m.name for m in metrics if m.kind == "adaptive" and m.name not in loo and m.name != "shapley"]
    if unknown:
        raise InputError(f"metric(s) {', '.join(unknown)} are registered but cannot be computed by `score` yet")
    scores, stderr = {}, {}
    for m in metrics:
        if m.name == "shapley":
            scores[m.name], stderr[m.name] = shapley_tables(shapley.values())
        else:
            scores[m.name], stderr[m.name] = _table(stats, m.name)
    definitions = {m.name: _definition(m, config) for m in metrics}
    if shapley:
        definitions["shapley"] = shapley_definition(get_metric("shapley"), shapley)
    return ScoreResult(
        model=model_name,
        family=layout.spec.family,
        n_layers=layout.n_layers,
        calibration=data.info,
        scores=scores,
        stderr=stderr,
        definitions=definitions,
        seed=config.seed,
        cost=cost,
    )


def _shapley(layout: ModelLayout, data: TokenBatches, config: ScoreConfig, tokenizer: Any | None) -> dict[str, ShapleyResult]:
    """Shapley values of every game the unit kinds make (``block``, ``sublayer``)."""
    from depthprune.data import context_length

    value = make_value(config.value_config(), data, tokenizer, context_length(layout.model))
    games = unit_games(layout.n_layers, config.units)
    out = {}
    for name, players in games.items():
        checkpoint = config.checkpoint
        if checkpoint is not None and len(games) > 1:
            checkpoint = f"{checkpoint}.{name}"
        out[name] = shapley_units(
            layout, value, players, config.shapley_config(), checkpoint=checkpoint, resume=config.resume,
            show_progress=config.show_progress,
        )
    return out


def shapley_tables(results: Any) -> tuple[dict[str, float], dict[str, float | None]]:
    """Scores and standard errors of Shapley results, merged and in unit order."""
    values: dict[Unit, tuple[float, float]] = {}
    for res in results:
        for u in res.players:
            values[u] = (res.values[u], res.stderr[u])
    order = sorted(values, key=lambda u: (u.index, UNIT_KINDS.index(u.kind)))

    def clean(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {str(u): clean(values[u][0]) for u in order}, {str(u): clean(values[u][1]) for u in order}  # type: ignore[misc]


def shapley_definition(metric: Metric, results: dict[str, ShapleyResult]) -> dict[str, Any]:
    """The ``definitions`` entry of the ``shapley`` metric: estimator, value and each game's run."""
    from depthprune.score.shapley import get_estimator

    first = next(iter(results.values()))
    value = first.game.get("value", {})
    est = get_estimator(first.estimator)
    games = {}
    for name, res in results.items():
        doc = res.to_dict()
        games[name] = {k: doc[k] for k in ("players", "v_full", "v_empty", "efficiency_gap", "samples", "layer_evals", "evaluations", "stopped", "details")}
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


def write_scores(result: ScoreResult, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``scores.json`` atomically (an existing file needs ``force``)."""
    return write_json_atomic(path, result.to_dict(), force=force)
