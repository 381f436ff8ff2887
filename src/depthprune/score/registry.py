"""The metric registry: every importance metric, its definition and where it comes from.

A static metric carries its per-token function (all of them are computed in one pass by
:mod:`depthprune.score.static`); an adaptive metric carries the function that computes it
(``compute``), which ``score`` calls once for all the requested metrics that share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from depthprune.errors import InputError
from depthprune.registry import Registry
from depthprune.units import UNIT_KINDS, Unit

if TYPE_CHECKING:
    from depthprune.data import TokenBatches
    from depthprune.score import ScoreConfig
    from depthprune.score.static import RunningStats
    from depthprune.units import ModelLayout

MetricKind = Literal["static", "adaptive"]
# A static metric maps per-token pieces to a per-token value:
# (cos(h_in, h_out), ||dh||_1 / ||h_in||_1, ||dh||_2 / ||h_in||_2) -> value
TokenFn = Callable[["TokenPieces"], torch.Tensor]


@dataclass(frozen=True)
class TokenPieces:
    """Per-token quantities from which every static metric is computed (float64, (M,))."""

    cos: torch.Tensor
    rel_l1: torch.Tensor
    rel_l2: torch.Tensor


@dataclass(frozen=True)
class AdaptiveRequest:
    """What an adaptive metric's ``compute`` gets.

    Attributes:
        layout: The model and its family spec.
        data: Calibration batches.
        units: Every unit to score, in unit order.
        config: The ``score`` settings (batch size, progress, and the metric's own settings).
        tokenizer: The model's tokenizer, or ``None``.
    """

    layout: ModelLayout
    data: TokenBatches
    units: list[Unit]
    config: ScoreConfig
    tokenizer: Any = None


@dataclass(frozen=True)
class MetricTables:
    """What an adaptive metric's ``compute`` returns.

    Attributes:
        scores: ``{metric: {unit name: score}}``, in unit order.
        stderr: ``{metric: {unit name: standard error or None}}``.
        cost: Layer-evaluations spent, under names for ``meta.cost``.
        definitions: ``definitions`` entries that replace the generic one of a metric.
    """

    scores: dict[str, dict[str, float | None]]
    stderr: dict[str, dict[str, float | None]]
    cost: dict[str, int] = field(default_factory=dict)
    definitions: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, stats: dict[tuple[str, Unit], RunningStats], metrics: Sequence[str], cost: dict[str, int]) -> MetricTables:
        """Tables of the means and standard errors of ``{(metric, unit): RunningStats}``."""
        scores, stderr = {}, {}
        for m in metrics:
            scores[m], stderr[m] = stats_table(stats, m)
        return cls(scores, stderr, cost)


# compute(request, metrics) -> tables of every metric in ``metrics`` (all share this compute).
AdaptiveFn = Callable[[AdaptiveRequest, Sequence["Metric"]], MetricTables]


def stats_table(stats: dict[tuple[str, Unit], RunningStats], metric: str) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """The means and standard errors of one metric's statistics, in unit order."""
    items = sorted(((u, s) for (m, u), s in stats.items() if m == metric), key=lambda us: (us[0].index, UNIT_KINDS.index(us[0].kind)))
    return {str(u): s.mean for u, s in items}, {str(u): (s.stderr if math.isfinite(s.stderr) else None) for u, s in items}


@dataclass(frozen=True)
class Metric:
    """One registered metric.

    Attributes:
        name: Registry key, used in scores.json.
        kind: ``static`` (one forward pass, hooks) or ``adaptive`` (masked evaluations).
        definition: What the number is; higher always means more important.
        reference: The paper the metric comes from.
        token_fn: For static metrics, the per-token value.
        compute: For adaptive metrics, what computes them (see :data:`AdaptiveFn`);
            metrics that share it are computed together.
    """

    name: str
    kind: MetricKind
    definition: str
    reference: str
    token_fn: TokenFn | None = None
    compute: AdaptiveFn | None = None


METRICS: Registry[Metric] = Registry("metric")


def register_metric(metric: Metric) -> Metric:
    """Add a metric to the registry."""
    if (metric.kind == "static") != (metric.token_fn is not None):
        raise ValueError(f"metric {metric.name!r}: static metrics, and only they, need a token_fn")
    if (metric.kind == "adaptive") != (metric.compute is not None):
        raise ValueError(f"metric {metric.name!r}: adaptive metrics, and only they, need a compute function")
    return METRICS.add(metric.name, metric)


def static_metric(name: str, definition: str, reference: str) -> Callable[[TokenFn], TokenFn]:
    """Register the decorated per-token function as a static metric."""

    def add(fn: TokenFn) -> TokenFn:
        register_metric(Metric(name, "static", definition, reference, fn))
        return fn

    return add


def get_metric(name: str) -> Metric:
    """Look a metric up, suggesting the closest name on a miss."""
    return METRICS.get(name)


def parse_metrics(spec: str | list[str]) -> list[Metric]:
    """Parse a comma-separated list of metric names, keeping order and dropping repeats."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise InputError("no metrics given; expected names such as cosine,rel_l2")
    return [get_metric(n) for n in dict.fromkeys(names)]


SHORTGPT = "Men et al. 2024, ShortGPT: Layers in Large Language Models are More Redundant Than You Expect (arXiv 2403.03853)"
DEEPER_LOOK = "Siddiqui et al. 2024, A deeper look at depth pruning of LLMs (arXiv 2407.16286)"
GROMOV = "Gromov et al. 2024, The Unreasonable Ineffectiveness of the Deeper Layers (arXiv 2403.17887)"


@static_metric(
    "cosine",
    "1 - mean over tokens of cos(h_in, h_out), where h_out = h_in + the unit's update",
    f"{SHORTGPT} (Block Influence); {DEEPER_LOOK}",
)
def _cosine(p: TokenPieces) -> torch.Tensor:
    return 1.0 - p.cos


@static_metric(
    "angular",
    "mean over tokens of arccos(cos(h_in, h_out)) / pi",
    GROMOV,
)
def _angular(p: TokenPieces) -> torch.Tensor:
    return torch.arccos(p.cos.clamp(-1.0, 1.0)) / torch.pi


@static_metric(
    "rel_l1",
    "mean over tokens of ||h_out - h_in||_1 / ||h_in||_1",
    DEEPER_LOOK,
)
def _rel_l1(p: TokenPieces) -> torch.Tensor:
    return p.rel_l1


@static_metric(
    "rel_l2",
    "mean over tokens of ||h_out - h_in||_2 / ||h_in||_2",
    DEEPER_LOOK,
)
def _rel_l2(p: TokenPieces) -> torch.Tensor:
    return p.rel_l2


@static_metric(
    "angular_span",
    "mean over tokens of arccos(cos(h_l, h_{l+n})) / pi between the input of block l and the output of "
    "block l+n-1; the value at block.l scores the span of n blocks starting at l",
    GROMOV,
)
def _angular_span(p: TokenPieces) -> torch.Tensor:
    return torch.arccos(p.cos.clamp(-1.0, 1.0)) / torch.pi


# The compute functions import their modules when called: those modules import this one.


def _leave_one_out(request: AdaptiveRequest, metrics: Sequence[Metric]) -> MetricTables:
    from depthprune.score.adaptive import leave_one_out

    names = [m.name for m in metrics]
    config = request.config
    stats, evals = leave_one_out(
        request.layout, request.data, request.units, names, batch_size=config.batch_size, show_progress=config.show_progress
    )
    return MetricTables.from_stats(stats, names, {"loo_layer_evals": evals})


def _shapley(request: AdaptiveRequest, metrics: Sequence[Metric]) -> MetricTables:
    from depthprune.score.shapley.metric import compute_shapley

    return compute_shapley(request, metrics)


register_metric(
    Metric(
        "loo_loss",
        "adaptive",
        "increase of the calibration LM loss (mean token cross-entropy) when only this unit is masked; "
        "the paper's code calls this 'Shapley', but it is leave-one-out",
        DEEPER_LOOK,
        compute=_leave_one_out,
    )
)
register_metric(
    Metric(
        "loo_kl",
        "adaptive",
        "mean over tokens of KL(p_full || p_masked) of the next-token distribution when only this unit is masked",
        DEEPER_LOOK,
        compute=_leave_one_out,
    )
)
register_metric(
    Metric(
        "shapley",
        "adaptive",
        "Shapley value of the unit in the game whose players are the units of its granularity (blocks, or "
        "attention and MLP sublayers) and whose value is the chosen value function (default: negative calibration "
        "loss) with the absent units masked; see 'estimator' and 'value' in this definition",
        DEEPER_LOOK,
        compute=_shapley,
    )
)
