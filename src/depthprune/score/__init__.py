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
from depthprune.score.static import RunningStats, collect_static
from depthprune.units import UNIT_KINDS, ModelLayout, Unit, all_units

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "ScoreConfig", "ScoreResult", "get_metric", "score", "write_scores"]

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
        seed: Recorded with the result (the calibration windows are drawn with it).
        show_progress: Show progress bars on a terminal.
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    units: tuple[str, ...] = UNIT_KINDS
    last_token_only: bool = False
    span: int = 1
    batch_size: int = 8
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        parse_metrics(list(self.metrics))
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
) -> ScoreResult:
    """Score every unit of ``model`` on calibration ``data``.

    All static metrics of all units come from one forward pass; adaptive metrics mask
    units one at a time and reuse the hidden states before them.

    Args:
        model: A Hugging Face causal LM of a supported family, in eval mode.
        data: Packed calibration tokens.
        config: Metrics, unit kinds and options; defaults to all static metrics of all units.
        spec: The family spec, looked up when omitted.
        model_name: Recorded in the result.

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
    unknown = [m.name for m in metrics if m.kind == "adaptive" and m.name not in loo]
    if unknown:
        raise InputError(f"metric(s) {', '.join(unknown)} are registered but cannot be computed by `score` yet")
    scores, stderr = {}, {}
    for m in metrics:
        scores[m.name], stderr[m.name] = _table(stats, m.name)
    return ScoreResult(
        model=model_name,
        family=layout.spec.family,
        n_layers=layout.n_layers,
        calibration=data.info,
        scores=scores,
        stderr=stderr,
        definitions={m.name: _definition(m, config) for m in metrics},
        seed=config.seed,
        cost=cost,
    )


def write_scores(result: ScoreResult, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``scores.json`` atomically (an existing file needs ``force``)."""
    return write_json_atomic(path, result.to_dict(), force=force)
