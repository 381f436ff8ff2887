"""Static importance metrics of every unit, from one forward pass with hooks.

For every decoder layer the hooks record the residual stream as
:mod:`depthprune.stream` defines it, and each unit gets an input, an update and an
output on the stream (:meth:`~depthprune.stream.LayerStreams.passage`):

- ``block.i``: the block input ``h_in`` -> the block output;
- ``attn.i``: ``h_in`` -> ``h_in + u_a``;
- ``mlp.i``: the stream entering the MLP path (``h_in + u_a``, or ``h_in`` with a
  parallel residual) -> that plus ``u_m``.

Per-token values are reduced at once into float64 running sums, so no hidden state
outlives its layer (a span metric keeps the ``n`` most recent block inputs).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from depthprune.data import TokenBatches
from depthprune.devices import input_device
from depthprune.distributed import all_reduce_sum, check_same, world
from depthprune.errors import InputError
from depthprune.progress import progress
from depthprune.score.registry import Metric, TokenPieces
from depthprune.stream import LayerStreams
from depthprune.units import SUBLAYER_KINDS, UNIT_KINDS, ModelLayout, Unit

logger = logging.getLogger(__name__)


class NonFiniteError(InputError):
    """The model produced NaN or infinite activations."""


@dataclass
class RunningStats:
    """Float64 running sum, sum of squares and count of one (metric, unit) pair."""

    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    def add(self, values: torch.Tensor) -> None:
        v = values.to(torch.float64)
        self.total += float(v.sum())
        self.total_sq += float((v * v).sum())
        self.count += int(v.numel())

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def stderr(self) -> float:
        """Standard error of the mean over tokens (tokens treated as independent)."""
        if self.count < 2:
            return float("nan")
        var = max(self.total_sq - self.count * self.mean**2, 0.0) / (self.count - 1)
        return (var / self.count) ** 0.5


def all_reduce_stats(stats: dict[Any, RunningStats]) -> dict[Any, RunningStats]:
    """``stats`` summed over torchrun ranks (itself without torchrun); every rank gets the totals."""
    if world().size == 1:
        return stats
    keys = sorted(stats, key=repr)
    check_same("statistics collected", "|".join(map(repr, keys)))
    sums = all_reduce_sum([x for k in keys for x in (stats[k].total, stats[k].total_sq, stats[k].count)])
    return {
        k: RunningStats(float(sums[3 * i]), float(sums[3 * i + 1]), round(float(sums[3 * i + 2])))
        for i, k in enumerate(keys)
    }


def _sum64(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1, dtype=torch.float64)


def token_pieces(h_in: torch.Tensor, h_out: torch.Tensor, delta: torch.Tensor, need_l1: bool = True) -> TokenPieces:
    """Per-token cosine and relative norms of an update. Inputs are ``(M, D)``; outputs ``(M,)`` float64.

    Half-precision inputs are widened to float32 first: products of bf16 values would
    round to 8 bits of mantissa before the float64 sums see them.
    """
    if h_in.element_size() < 4:
        h_in, h_out, delta = h_in.float(), h_out.float(), delta.float()
    in2 = _sum64(h_in * h_in)
    out2 = _sum64(h_out * h_out)
    cos = _sum64(h_in * h_out) / (in2 * out2).sqrt().clamp_min(1e-300)
    rel_l2 = (_sum64(delta * delta) / in2).sqrt()
    rel_l1 = _sum64(delta.abs()) / _sum64(h_in.abs()) if need_l1 else torch.full_like(cos, float("nan"))
    return TokenPieces(cos=cos, rel_l1=rel_l1, rel_l2=rel_l2)


@dataclass
class StaticCollector:
    """Registers hooks that turn one forward pass into static metrics of many units.

    Args:
        layout: The model and its family spec.
        units: Units to score (any mix of block, attn and mlp).
        metrics: Static metrics to compute for them.
        last_token_only: Score only each sequence's last real token.
        span: With the ``angular_span`` metric, the number of blocks in a span.
    """

    layout: ModelLayout
    units: list[Unit]
    metrics: list[Metric]
    last_token_only: bool = False
    span: int = 1
    stats: dict[tuple[str, Unit], RunningStats] = field(default_factory=dict)
    _select: Callable[[torch.Tensor], torch.Tensor] | None = None
    _block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._unit_metrics = [m for m in self.metrics if m.name != "angular_span"]
        self._span_metric = next((m for m in self.metrics if m.name == "angular_span"), None)
        n = self.layout.n_layers
        if self._span_metric is not None and not 1 <= self.span <= n:
            raise InputError(f"span must be between 1 and the number of layers ({n}), got {self.span}")
        self._need_l1 = any(m.name == "rel_l1" for m in self._unit_metrics)
        self._wanted = {(u.kind, u.index) for u in self.units}
        self._layers_needed = sorted({u.index for u in self.units} | (set(range(n)) if self._span_metric else set()))

    # -- hooks ---------------------------------------------------------------------------

    def attach(self) -> None:
        """Register the hooks on every layer that has a unit to score."""
        for i in self._layers_needed:
            self._handles.extend(self.attach_layer(i))

    def attach_layer(self, i: int) -> list[Any]:
        """Register the hooks of layer ``i`` alone (none when it has no unit to score) and
        return their handles; layer-streamed execution hooks one layer at a time."""
        if i not in self._layers_needed:
            return []
        kinds = [k for k in SUBLAYER_KINDS if (k, i) in self._wanted]
        return self.layout.stream.record(self.layout.layers[i], kinds, functools.partial(self._finish_layer, i))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._block_inputs.clear()

    # -- statistics ----------------------------------------------------------------------

    def set_tokens(self, attention_mask: torch.Tensor) -> None:
        """Choose which positions of the next batch count: real tokens, or the last one."""
        mask = attention_mask.bool()
        if self.last_token_only:
            last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # (B,) last real position
            rows = torch.arange(mask.shape[0], device=mask.device)
            # Under a device map the layers sit on several GPUs: index where h lives.
            self._select = lambda h: h[rows.to(h.device), last.to(h.device)]
        elif bool(mask.all()):
            self._select = lambda h: h.reshape(-1, h.shape[-1])
        else:
            self._select = lambda h: h[mask.to(h.device)]

    def _add(self, unit: Unit, h_in: torch.Tensor, h_out: torch.Tensor, delta: torch.Tensor) -> None:
        pieces = token_pieces(h_in, h_out, delta, self._need_l1)
        for metric in self._unit_metrics:
            values = metric.token_fn(pieces)  # type: ignore[misc]
            if not bool(torch.isfinite(values).all()):
                raise NonFiniteError(
                    f"non-finite activations at {unit} ({metric.name} is NaN or infinite): the model's weights or "
                    "dtype are broken; check the checkpoint, or try --dtype float32"
                )
            self.stats.setdefault((metric.name, unit), RunningStats()).add(values)

    def _finish_layer(self, i: int, streams: LayerStreams) -> None:
        sel = self._select
        assert sel is not None, "set_tokens() must be called before the forward pass"
        for kind in UNIT_KINDS:
            if (kind, i) in self._wanted:
                passage = streams.passage(kind, sel)
                self._add(Unit(kind, i), passage.entering, passage.leaving, passage.update)
        if self._span_metric is not None:
            h_in, h_out = sel(streams.h_in), sel(streams.h_out)
            self._block_inputs[i] = h_in
            start = i - self.span + 1
            if start >= 0:
                first = self._block_inputs.pop(start)
                pieces = token_pieces(first, h_out, h_out - first, need_l1=False)
                values = self._span_metric.token_fn(pieces)  # type: ignore[misc]
                self.stats.setdefault((self._span_metric.name, Unit("block", start)), RunningStats()).add(values)


@torch.no_grad()
def collect_static(
    layout: ModelLayout,
    data: TokenBatches,
    units: Iterable[Unit],
    metrics: list[Metric],
    *,
    batch_size: int = 8,
    last_token_only: bool = False,
    span: int = 1,
    show_progress: bool = True,
) -> dict[tuple[str, Unit], RunningStats]:
    """Run the calibration data through the model once and return the static statistics.

    Returns:
        ``{(metric, unit): RunningStats}``; span metrics are keyed by the span's first block.
    """
    collector = StaticCollector(layout, list(units), metrics, last_token_only, span)
    model = layout.model
    device = input_device(model)
    collector.attach()
    try:
        for ids, mask in progress(list(data.rank_share().batches(batch_size)), desc="static metrics", disable=not show_progress):
            collector.set_tokens(mask.to(device))
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
    finally:
        collector.detach()
    return all_reduce_stats(collector.stats)
