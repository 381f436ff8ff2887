"""Adaptive metrics: evaluate the model with units masked, reusing cached prefixes.

Masking a unit of layer ``i`` changes nothing before layer ``i``, so an evaluation starts
from the cached input of layer ``i``: layers before it are swapped for pass-through
modules and layer ``i`` reads the cached hidden state. The model's own forward still runs
its embeddings, masks, final norm, head and any logit soft-capping, so no family
knowledge is needed. Cost is counted in layer-evaluations (layers run x sequences).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from depthprune.data import TokenBatches
from depthprune.devices import input_device
from depthprune.distributed import all_reduce_sum
from depthprune.progress import counter
from depthprune.score.static import NonFiniteError, RunningStats, all_reduce_stats
from depthprune.stream import hidden_arg, on_layer_input, with_hidden_arg
from depthprune.units import ModelLayout, Unit, mask_units

logger = logging.getLogger(__name__)


class _PassThrough(nn.Module):
    """Stands in for a decoder layer whose output is already known: returns its input."""

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = hidden_arg(args, kwargs)
        return (hidden,) if self.returns_tuple else hidden


@dataclass
class PrefixRunner:
    """Runs a model from the cached input of any layer.

    Attributes:
        layout: The model and its family spec.
        layer_evals: Layers run so far, times sequences (the cost measure).
    """

    layout: ModelLayout
    layer_evals: int = 0
    _returns_tuple: bool = False
    _inputs: list[torch.Tensor] = field(default_factory=list)

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the full model, keep every layer's input, and return the logits ``(B, T, V)``."""
        inputs: list[torch.Tensor] = []
        handles = []

        def kind(_m: nn.Module, _a: tuple, out: Any) -> None:
            self._returns_tuple = isinstance(out, tuple)

        for layer in self.layout.layers:
            handles.append(on_layer_input(layer, inputs.append))
        handles.append(self.layout.layers[0].register_forward_hook(kind))
        try:
            logits = self.layout.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        self._inputs = inputs
        self.layer_evals += self.layout.n_layers * input_ids.shape[0]
        return logits

    @contextlib.contextmanager
    def start_at(self, index: int) -> Iterator[None]:
        """Inside the block, a forward pass skips layers ``< index`` and feeds layer ``index``
        the cached input of the last :meth:`capture`."""
        if not self._inputs:
            raise RuntimeError("capture() must run before start_at()")
        with self.start_from(index, self._inputs[index]):
            yield

    @contextlib.contextmanager
    def start_from(self, index: int, cached: torch.Tensor) -> Iterator[None]:
        """Inside the block, a forward pass skips layers ``< index`` and feeds layer ``index``
        the hidden state ``cached`` ``(B, T, D)`` instead of what the layers before it give."""
        layers = self.layout.layers
        saved = [layers._modules[str(j)] for j in range(index)]

        def feed(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return with_hidden_arg(args, kwargs, cached)

        handle = layers[index].register_forward_pre_hook(feed, with_kwargs=True)
        for j in range(index):
            layers._modules[str(j)] = _PassThrough(self._returns_tuple)
        try:
            yield
        finally:
            handle.remove()
            for j, module in enumerate(saved):
                layers._modules[str(j)] = module

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, masked: Iterable[Unit]) -> torch.Tensor:
        """Logits with ``masked`` units disabled, recomputing only from the first affected layer."""
        masked = list(masked)
        start = min((u.index for u in masked), default=self.layout.n_layers - 1)
        with mask_units(self.layout.model, masked, self.layout.spec), self.start_at(start):
            logits = self.layout.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        self.layer_evals += (self.layout.n_layers - start) * input_ids.shape[0]
        return logits

    @torch.no_grad()
    def run_from(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        masked: Iterable[Unit],
        start: int = 0,
        hidden: torch.Tensor | None = None,
        keep: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits with ``masked`` disabled, running only layers ``start..L-1``.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)``, 1 for real tokens.
            masked: Units to disable; only those of layers ``>= start`` matter.
            start: First layer to run. Layers before it are skipped.
            hidden: The input of layer ``start`` ``(B, T, D)``; required when ``start > 0``.
            keep: Also return the inputs of layers ``start+1..L-1`` seen on the way.

        Returns:
            The logits ``(B, T, V)`` and the kept layer inputs (empty unless ``keep``).
        """
        if start > 0 and hidden is None:
            raise ValueError("run_from() needs the hidden input of layer `start` when start > 0")
        kept: list[torch.Tensor] = []

        def kind(_m: nn.Module, _a: tuple, out: Any) -> None:
            self._returns_tuple = isinstance(out, tuple)

        layers = self.layout.layers
        later = range(start + 1, self.layout.n_layers) if keep else range(0)
        handles = [on_layer_input(layers[j], kept.append) for j in later]
        if start == 0:
            # A later start_from() needs to know what a layer returns.
            handles.append(layers[0].register_forward_hook(kind))
        feed = self.start_from(start, hidden) if start > 0 else contextlib.nullcontext()
        try:
            with mask_units(self.layout.model, [u for u in masked if u.index >= start], self.layout.spec), feed:
                logits = self.layout.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        self.layer_evals += (self.layout.n_layers - start) * input_ids.shape[0]
        return logits, kept


@dataclass(frozen=True)
class NextTokenTargets:
    """Next-token targets of a batch and the full model's log-probabilities."""

    targets: torch.Tensor  # (B, T-1)
    valid: torch.Tensor  # (B, T-1) bool
    logp_full: torch.Tensor  # (B, T-1, V) float32

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits: torch.Tensor) -> NextTokenTargets:
        # Under a device map the logits come from the last GPU's head: compare them there.
        input_ids, attention_mask = input_ids.to(logits.device), attention_mask.to(logits.device)
        valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        return cls(input_ids[:, 1:], valid, F.log_softmax(logits[:, :-1].float(), dim=-1))

    def nll(self, logp: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood ``(B, T-1)``."""
        return -logp.gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)

    def per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of per-token ``values`` over each sequence's valid tokens ``(B,)``."""
        w = self.valid.to(values.dtype)
        return (values * w).sum(-1) / w.sum(-1).clamp_min(1)


def _check_finite(values: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(
            f"non-finite values in {what}: the model's weights or dtype are broken; check the checkpoint, or try --dtype float32"
        )


@torch.no_grad()
def leave_one_out(
    layout: ModelLayout,
    data: TokenBatches,
    units: Iterable[Unit],
    metrics: Iterable[str],
    *,
    batch_size: int = 8,
    show_progress: bool = True,
) -> tuple[dict[tuple[str, Unit], RunningStats], int]:
    """Mask each unit alone and measure the change of the calibration loss and distribution.

    Args:
        layout: The model and its family spec.
        data: Calibration batches.
        units: Units to score.
        metrics: Any of ``loo_loss`` and ``loo_kl``.
        batch_size: Sequences per forward pass.
        show_progress: Show a progress bar on a terminal.

    Returns:
        ``{(metric, unit): RunningStats}`` over sequences (each value is a sequence's mean),
        and the cost in layer-evaluations.
    """
    units = list(units)
    metrics = list(metrics)
    runner = PrefixRunner(layout)
    device = input_device(layout.model)
    stats: dict[tuple[str, Unit], RunningStats] = {}
    batches = list(data.rank_share().batches(batch_size))
    with counter(len(batches) * len(units), desc="leave-one-out", disable=not show_progress) as bar:
        for ids, mask in batches:
            _loo_batch(runner, ids.to(device), mask.to(device), units, metrics, stats, bar)
    (evals,) = all_reduce_sum([runner.layer_evals])
    return all_reduce_stats(stats), round(float(evals))


def loo_reference(ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> tuple[NextTokenTargets, torch.Tensor]:
    """The full model's targets and log-probabilities of a batch, and its per-token NLL ``(B, T-1)``."""
    ref = NextTokenTargets.of(ids, mask, logits)
    nll_full = ref.nll(ref.logp_full)
    _check_finite(nll_full, "the full model's loss")
    return ref, nll_full


def _loo_batch(
    runner: PrefixRunner,
    ids: torch.Tensor,
    mask: torch.Tensor,
    units: list[Unit],
    metrics: list[str],
    stats: dict[tuple[str, Unit], RunningStats],
    bar: Any,
) -> None:
    """Leave-one-out statistics of one batch, added to ``stats``."""
    ref, nll_full = loo_reference(ids, mask, runner.capture(ids, mask))
    for unit in units:
        bar.update()
        logits = runner.run(ids, mask, [unit])
        add_loo_stats(ref, nll_full, logits, unit, metrics, stats)


def add_loo_stats(
    ref: NextTokenTargets,
    nll_full: torch.Tensor,
    logits: torch.Tensor,
    unit: Unit,
    metrics: list[str],
    stats: dict[tuple[str, Unit], RunningStats],
) -> None:
    """Add the leave-one-out values of ``unit`` on some sequences to ``stats``.

    Args:
        ref: The sequences' targets and the full model's log-probabilities.
        nll_full: The full model's per-token NLL ``(B, T-1)``.
        logits: The logits with ``unit`` masked ``(B, T, V)``.
        unit: The masked unit.
        metrics: Any of ``loo_loss`` and ``loo_kl``.
        stats: ``{(metric, unit): RunningStats}`` over sequences, updated in place.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    if "loo_loss" in metrics:
        delta = ref.per_sequence(ref.nll(logp) - nll_full)
        _check_finite(delta, f"the loss with {unit} masked")
        stats.setdefault(("loo_loss", unit), RunningStats()).add(delta)
    if "loo_kl" in metrics:
        kl = (ref.logp_full.exp() * (ref.logp_full - logp)).sum(-1)
        kl = ref.per_sequence(kl)
        _check_finite(kl, f"the KL divergence with {unit} masked")
        stats.setdefault(("loo_kl", unit), RunningStats()).add(kl)
