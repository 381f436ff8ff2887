"""The ``score`` stage: how much each unit matters, by every registered metric.

In every result a higher score means more important.
"""

from __future__ import annotations

import logging
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
from depthprune.identity import config_sha256
from depthprune.score.registry import (
    METRICS,
    AdaptiveFn,
    AdaptiveRequest,
    Metric,
    get_metric,
    parse_metrics,
    stats_table,
)
from depthprune.score.shapley import ShapleyConfig
from depthprune.score.shapley.metric import shapley_definition, shapley_tables
from depthprune.score.static import RunningStats, collect_static
from depthprune.score.values import ValueConfig
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
        batch_size: Sequences per forward pass (static and leave-one-out metrics; the
            ``shapley`` metric uses ``shapley.batch_size``).
        seed: Recorded with the result (the calibration windows are drawn with it); the
            ``shapley`` sampling is seeded by ``shapley.seed``.
        show_progress: Show progress bars on a terminal.
        shapley: The ``shapley`` metric's estimator and stopping rules.
        value: The ``shapley`` metric's value function (``loss``, ``kl`` or ``mmlu``).
        checkpoint: ``shapley``: save progress to this JSON file (``.block``/``.sublayer``
            appended when both games run).
        resume: ``shapley``: continue from ``checkpoint``.
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    units: tuple[str, ...] = UNIT_KINDS
    last_token_only: bool = False
    span: int = 1
    batch_size: int = 8
    seed: int = 0
    show_progress: bool = True
    shapley: ShapleyConfig = field(default_factory=ShapleyConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    checkpoint: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        parse_metrics(list(self.metrics))
        for name, cls in (("shapley", ShapleyConfig), ("value", ValueConfig)):
            if not isinstance(getattr(self, name), cls):
                raise InputError(
                    f"ScoreConfig.{name} is a {type(getattr(self, name)).__name__}; expected a {cls.__name__}, "
                    f"e.g. ScoreConfig({name}={cls.__name__}(...))"
                )
        if not self.units:
            raise InputError("no unit kinds given; expected any of block,attn,mlp")
        all_units(1, self.units)  # validates the kinds
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if self.span < 1:
            raise InputError(f"span must be at least 1, got {self.span}")
        if "angular_span" in self.metrics and "block" not in self.units:
            raise InputError("angular_span scores spans of blocks; add 'block' to the unit kinds")


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
    config_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``scores.json`` document."""
        return {
            "model": self.model,
            "family": self.family,
            "n_layers": self.n_layers,
            "config_sha256": self.config_sha256,
            "calibration": self.calibration.to_dict(),
            "scores": self.scores,
            "stderr": self.stderr,
            "definitions": self.definitions,
            "meta": {
                "version": __version__,
                "seed": self.seed,
                "cost": self.cost,
            },
        }

    def ranking(self, metric: str) -> list[str]:
        """Units by ``metric``, least important first (ties in unit order)."""
        values = self.scores[metric]
        position = {u: k for k, u in enumerate(values)}  # tables are in unit order
        return sorted(values, key=lambda u: (values[u], position[u]))


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
    scores: dict[str, dict[str, float | None]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    definitions = {m.name: _definition(m, config) for m in metrics}
    cost: dict[str, int] = {}
    static = [m for m in metrics if m.kind == "static"]
    if static:
        stats: dict[tuple[str, Unit], RunningStats] = collect_static(
            layout,
            data,
            units,
            static,
            batch_size=config.batch_size,
            last_token_only=config.last_token_only,
            span=config.span,
            show_progress=config.show_progress,
        )
        for m in static:
            scores[m.name], stderr[m.name] = stats_table(stats, m.name)
        cost["static_layer_evals"] = layout.n_layers * len(data)
    # Each adaptive metric carries what computes it; metrics that share it run together.
    groups: dict[AdaptiveFn, list[Metric]] = {}
    for m in metrics:
        if m.compute is not None:
            groups.setdefault(m.compute, []).append(m)
    request = AdaptiveRequest(layout, data, units, config, tokenizer)
    for compute, group in groups.items():
        tables = compute(request, group)
        scores.update(tables.scores)
        stderr.update(tables.stderr)
        cost.update(tables.cost)
        definitions.update(tables.definitions)
    return ScoreResult(
        model=model_name,
        family=layout.spec.family,
        n_layers=layout.n_layers,
        calibration=data.info,
        scores={m.name: scores[m.name] for m in metrics},
        stderr={m.name: stderr[m.name] for m in metrics},
        definitions=definitions,
        seed=config.seed,
        cost=cost,
        config_sha256=config_sha256(model.config),
    )


def write_scores(result: ScoreResult, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``scores.json`` atomically (an existing file needs ``force``)."""
    return write_json_atomic(path, result.to_dict(), force=force)
