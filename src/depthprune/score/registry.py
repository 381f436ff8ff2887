"""The metric registry: every importance metric, its definition and where it comes from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from depthprune.errors import InputError
from depthprune.registry import Registry

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
class Metric:
    """One registered metric.

    Attributes:
        name: Registry key, used in scores.json.
        kind: ``static`` (one forward pass, hooks) or ``adaptive`` (masked evaluations).
        definition: What the number is; higher always means more important.
        reference: The paper the metric comes from.
        token_fn: For static metrics, the per-token value.
    """

    name: str
    kind: MetricKind
    definition: str
    reference: str
    token_fn: TokenFn | None = None


METRICS: Registry[Metric] = Registry("metric")


def register_metric(metric: Metric) -> Metric:
    """Add a metric to the registry."""
    if (metric.kind == "static") != (metric.token_fn is not None):
        raise ValueError(f"metric {metric.name!r}: static metrics, and only they, need a token_fn")
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


register_metric(
    Metric(
        "loo_loss",
        "adaptive",
        "increase of the calibration LM loss (mean token cross-entropy) when only this unit is masked; "
        "the paper's code calls this 'Shapley', but it is leave-one-out",
        DEEPER_LOOK,
    )
)
register_metric(
    Metric(
        "loo_kl",
        "adaptive",
        "mean over tokens of KL(p_full || p_masked) of the next-token distribution when only this unit is masked",
        DEEPER_LOOK,
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
    )
)
