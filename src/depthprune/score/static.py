"""Static importance metrics of every unit, from one forward pass with hooks.

For every decoder layer the hooks see the block input ``h_in``, the attention path's
update ``u_a`` (after any post-norm), the MLP path's input and update ``u_m`` and the
block output. From these each unit gets an input and an output on the residual stream:

- ``block.i``: ``h_in`` -> block output;
- ``attn.i``: ``h_in`` -> ``h_in + u_a``;
- ``mlp.i``: the stream before the MLP path (``h_in + u_a``, or ``h_in`` with a parallel
  residual) -> that plus ``u_m``.

Per-token values are reduced at once into float64 running sums, so no hidden state
outlives its layer (a span metric keeps the ``n`` most recent block inputs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from depthprune.architectures import get_submodule
from depthprune.data import TokenBatches
from depthprune.errors import InputError
from depthprune.progress import progress
from depthprune.score.registry import Metric, TokenPieces
from depthprune.units import ModelLayout, Unit

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


def _hidden(out: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (a tensor, or a tuple led by one)."""
    return out[0] if isinstance(out, (tuple, list)) else out


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
class _LayerCapture:
    h_in: torch.Tensor | None = None
    u_attn: torch.Tensor | None = None
    h_mid: torch.Tensor | None = None
    u_mlp: torch.Tensor | None = None


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
    _capture: dict[int, _LayerCapture] = field(default_factory=dict)
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

    def _last_module(self, layer: nn.Module, kind: str) -> nn.Module:
        path = self.layout.spec.path(kind)
        return get_submodule(layer, path.post_norms[-1] if path.post_norms else path.module)

    def attach(self) -> None:
        """Register the hooks on every layer that has a unit to score."""
        parallel = self.layout.parallel
        for i in self._layers_needed:
            layer = self.layout.layers[i]
            cap = self._capture.setdefault(i, _LayerCapture())

            def pre(_m: nn.Module, args: tuple, kwargs: dict, cap: _LayerCapture = cap) -> None:
                cap.h_in = args[0] if args else kwargs["hidden_states"]

            def on_attn(_m: nn.Module, _a: tuple, out: Any, cap: _LayerCapture = cap) -> None:
                cap.u_attn = _hidden(out)

            def on_mlp_in(_m: nn.Module, args: tuple, cap: _LayerCapture = cap) -> None:
                cap.h_mid = args[0]

            def on_mlp(_m: nn.Module, _a: tuple, out: Any, cap: _LayerCapture = cap) -> None:
                cap.u_mlp = _hidden(out)

            def post(_m: nn.Module, _a: tuple, out: Any, i: int = i) -> None:
                self._finish_layer(i, _hidden(out))

            self._handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(self._last_module(layer, "attn").register_forward_hook(on_attn))
            self._handles.append(self._last_module(layer, "mlp").register_forward_hook(on_mlp))
            mlp_pre = self.layout.spec.mlp.pre_norms
            if not parallel and mlp_pre:
                # The stream entering the MLP path is exactly what its first norm reads.
                self._handles.append(get_submodule(layer, mlp_pre[0]).register_forward_pre_hook(on_mlp_in))
            self._handles.append(layer.register_forward_hook(post))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._capture.clear()
        self._block_inputs.clear()

    # -- statistics ----------------------------------------------------------------------

    def set_tokens(self, attention_mask: torch.Tensor) -> None:
        """Choose which positions of the next batch count: real tokens, or the last one."""
        mask = attention_mask.bool()
        if self.last_token_only:
            last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # (B,) last real position
            rows = torch.arange(mask.shape[0])
            self._select = lambda h: h[rows, last]
        elif bool(mask.all()):
            self._select = lambda h: h.reshape(-1, h.shape[-1])
        else:
            self._select = lambda h: h[mask]

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

    def _finish_layer(self, i: int, h_out_full: torch.Tensor) -> None:
        cap = self._capture[i]
        sel = self._select
        assert sel is not None and cap.h_in is not None, "set_tokens() must be called before the forward pass"
        h_in, h_out = sel(cap.h_in), sel(h_out_full)
        if ("block", i) in self._wanted:
            self._add(Unit("block", i), h_in, h_out, h_out - h_in)
        if ("attn", i) in self._wanted or ("mlp", i) in self._wanted:
            u_a, u_m = sel(cap.u_attn), sel(cap.u_mlp)
            attn_out = sel(cap.h_mid) if cap.h_mid is not None else h_in + u_a
            if ("attn", i) in self._wanted:
                self._add(Unit("attn", i), h_in, attn_out, u_a)
            if ("mlp", i) in self._wanted:
                mlp_in = h_in if self.layout.parallel else attn_out
                mlp_out = h_in + u_m if self.layout.parallel else h_out
                self._add(Unit("mlp", i), mlp_in, mlp_out, u_m)
        if self._span_metric is not None:
            self._block_inputs[i] = h_in
            start = i - self.span + 1
            if start >= 0:
                first = self._block_inputs.pop(start)
                pieces = token_pieces(first, h_out, h_out - first, need_l1=False)
                values = self._span_metric.token_fn(pieces)  # type: ignore[misc]
                self.stats.setdefault((self._span_metric.name, Unit("block", start)), RunningStats()).add(values)
        cap.h_in = cap.u_attn = cap.h_mid = cap.u_mlp = None  # the hooks hold this object


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
    device = next(model.parameters()).device
    collector.attach()
    try:
        for ids, mask in progress(list(data.batches(batch_size)), desc="static metrics", disable=not show_progress):
            collector.set_tokens(mask.to(device))
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
    finally:
        collector.detach()
    return collector.stats
