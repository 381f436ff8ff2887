"""Emulated updates of removed units, fitted in closed form from one calibration pass.

For a removed unit with input ``h`` (the raw residual stream entering it) and update
``dh`` (what it adds to the stream, after any post-norm):

- bias: ``dh ~ b`` with ``b = E[dh]``;
- low-rank: ``dh ~ b + (h - mu) A B`` with ``mu = E[h]``, ``A`` of shape ``(D, r)`` and
  ``B`` of shape ``(r, D)``, by reduced-rank ridge regression (Mukherjee & Zhu, 2011):
  the full ridge solution ``W = (S_hh + lam I)^-1 S_hd`` on centred statistics, projected
  onto the top-``r`` right singular subspace ``V_r`` of the ridge fitted values, i.e. the
  top eigenvectors of ``W^T (S_hh + lam I) W``; then ``A = W V_r`` and ``B = V_r^T``.
  This is the exact minimiser of ``||dh - b - (h - mu) M||^2 + lam ||M||^2`` over
  ``rank(M) <= r``. At ``r = D`` it is the ridge solution, and at ``lam = 0`` ordinary
  least squares.

The ridge is relative: ``lam = ridge * trace(S_hh) / D`` (the mean variance of a
feature), so one default (:data:`DEFAULT_RIDGE`) fits every model scale.

Statistics come from one forward pass of the *unpruned* model over the calibration data,
with hooks, for all units at once; every unit is fitted on its input and update in the
original model. Per unit the pass keeps float64 running sums of ``h``, ``dh``,
``h h^T`` and ``h dh^T`` (two ``D x D`` matrices, only for low-rank units), shifted by the
first batch's means for numerical stability. No hidden state outlives its layer, and the
pass stops after the last layer that holds a unit.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from depthprune.architectures import ArchSpec
from depthprune.data import TokenBatches
from depthprune.devices import HOST, input_device
from depthprune.distributed import all_reduce_sum, world
from depthprune.errors import InputError
from depthprune.progress import progress
from depthprune.recover.emulators import (
    REPLACE_HELP,
    REPLACE_RE,
    BiasEmulator,
    LinearEmulator,
    LowRankEmulator,
    describe,
    empty_emulator,
    parse_replace,
    parse_stand_in,
)
from depthprune.recover.install import Installed, install_
from depthprune.stream import LayerStreams, Writer
from depthprune.units import ModelLayout, Unit, removed_paths

logger = logging.getLogger(__name__)

# Re-exported: the modules live in depthprune.recover.emulators.
__all__ = [
    "DEFAULT_RIDGE",
    "REPLACE_HELP",
    "REPLACE_RE",
    "BiasEmulator",
    "EmulationConfig",
    "LinearEmulator",
    "LowRankEmulator",
    "RecoverResult",
    "UpdateCollector",
    "UpdateStats",
    "collect_updates",
    "describe",
    "empty_emulator",
    "emulate",
    "emulator_from_stats",
    "fit_emulators",
    "linear_writers",
    "parse_replace",
    "parse_stand_in",
    "recover_",
    "solve_linear",
    "solve_lowrank",
]

DEFAULT_RIDGE = 1e-3


# --------------------------------------------------------------------------- statistics


@dataclass
class UpdateStats:
    """Streaming first and second moments of one unit's input ``h`` and update ``dh``.

    Sums are float64 and taken around a shift (the first batch's means), which keeps the
    centred covariance accurate when the stream has a large mean.

    Attributes:
        dim: Width ``D``.
        second_moments: Keep the ``D x D`` sums (needed for low-rank fits only).
    """

    dim: int
    second_moments: bool = True
    n: int = 0
    shift_h: torch.Tensor | None = None
    shift_d: torch.Tensor | None = None
    sum_h: torch.Tensor | None = None
    sum_d: torch.Tensor | None = None
    sum_hh: torch.Tensor | None = None
    sum_hd: torch.Tensor | None = None

    def add(self, h: torch.Tensor, dh: torch.Tensor) -> None:
        """Add ``(M, D)`` rows of inputs and updates."""
        if h.shape[0] == 0:
            return
        d64 = dh.detach().to(torch.float64)
        if self.shift_d is None:
            self.shift_d = d64.mean(0)
            self.sum_d = torch.zeros_like(self.shift_d)
        dc = d64 - self.shift_d  # (M, D)
        self.sum_d += dc.sum(0)
        if self.second_moments:
            h64 = h.detach().to(torch.float64)
            if self.shift_h is None:
                self.shift_h = h64.mean(0)
                self.sum_h = torch.zeros_like(self.shift_h)
                self.sum_hh = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=h.device)
                self.sum_hd = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=h.device)
            hc = h64 - self.shift_h  # (M, D)
            self.sum_h += hc.sum(0)
            self.sum_hh.addmm_(hc.T, hc)
            self.sum_hd.addmm_(hc.T, dc)
        self.n += int(h.shape[0])

    def recentred(self, shift_h: torch.Tensor, shift_d: torch.Tensor) -> UpdateStats:
        """The same statistics with their sums taken around other shifts (exact algebra).

        With ``e = old - new`` shift: ``sum(x - new) = S + n e`` and
        ``sum((h - new_h)(d - new_d)^T) = S_hd + S_h e_d^T + e_h S_d^T + n e_h e_d^T``.
        Statistics with no rows get zero sums.
        """
        dim, n = self.dim, float(self.n)
        zeros = torch.zeros(dim, dtype=torch.float64, device=shift_d.device)
        old_d = self.shift_d if self.shift_d is not None else shift_d
        e_d = old_d - shift_d
        sum_d = self.sum_d if self.sum_d is not None else zeros
        out = UpdateStats(dim, self.second_moments, self.n, shift_d=shift_d, sum_d=sum_d + n * e_d)
        if self.second_moments:
            old_h = self.shift_h if self.shift_h is not None else shift_h
            e_h = old_h - shift_h
            sum_h = self.sum_h if self.sum_h is not None else zeros
            square = torch.zeros(dim, dim, dtype=torch.float64, device=shift_d.device)
            sum_hh = self.sum_hh if self.sum_hh is not None else square
            sum_hd = self.sum_hd if self.sum_hd is not None else square
            out.shift_h = shift_h
            out.sum_h = sum_h + n * e_h
            out.sum_hh = sum_hh + torch.outer(sum_h, e_h) + torch.outer(e_h, sum_h) + n * torch.outer(e_h, e_h)
            out.sum_hd = sum_hd + torch.outer(sum_h, e_d) + torch.outer(e_h, sum_d) + n * torch.outer(e_h, e_d)
        return out

    def all_reduce_(self) -> None:
        """Sum these statistics over torchrun ranks in place (nothing without torchrun).

        Each rank's sums are taken around its own shift, so they are first moved to a
        common one (the token-weighted mean of the ranks' shifts) by :meth:`recentred`;
        then sums and counts are added. Every rank must call this for the same units in
        the same order.
        """
        if world().size == 1:
            return
        n = float(self.n)
        zeros = torch.zeros(self.dim, dtype=torch.float64, device=self._device())
        s_d = self.shift_d if self.shift_d is not None else zeros
        s_h = self.shift_h if self.shift_h is not None else zeros
        total, weighted_d, weighted_h = all_reduce_sum([n, n * s_d, n * s_h])
        if total.item() == 0:
            return
        common = self.recentred(weighted_h / total.item(), weighted_d / total.item())
        names = ["sum_d", *(["sum_h", "sum_hh", "sum_hd"] if self.second_moments else [])]
        reduced = all_reduce_sum([getattr(common, name) for name in names])
        self.n = round(total.item())
        self.shift_d, self.shift_h = common.shift_d, common.shift_h if self.second_moments else None
        for name, value in zip(names, reduced, strict=True):
            setattr(self, name, value)

    def _device(self) -> torch.device:
        for t in (self.shift_d, self.shift_h):
            if t is not None:
                return t.device
        return HOST  # no tokens reached this unit here: the sums are zeros, moved to the comm device

    def _check(self, what: str) -> None:
        if self.n == 0:
            raise InputError(f"no calibration tokens reached this unit, so its {what} cannot be fitted; give more data")

    def mean_update(self) -> torch.Tensor:
        """``E[dh]``, float64 ``(D,)``."""
        self._check("bias")
        return self.shift_d + self.sum_d / self.n

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mu, b, cov_hh, cov_hd)``: means and centred (biased) covariances, float64."""
        self._check("low-rank map")
        if not self.second_moments:
            raise InputError("these statistics were collected without second moments; a low-rank fit needs them")
        mh = self.sum_h / self.n
        md = self.sum_d / self.n
        cov_hh = self.sum_hh / self.n - torch.outer(mh, mh)
        cov_hd = self.sum_hd / self.n - torch.outer(mh, md)
        return self.shift_h + mh, self.shift_d + md, cov_hh, cov_hd


def solve_lowrank(
    stats: UpdateStats, rank: int, ridge: float = DEFAULT_RIDGE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced-rank ridge regression of ``dh`` on ``h`` from streaming statistics.

    Args:
        stats: Moments of the unit's inputs and updates.
        rank: ``r``; capped at ``D``.
        ridge: Relative ridge: ``lam = ridge * trace(cov_hh) / D``; ``0`` for least squares.

    Returns:
        ``(mu, A, B, b)`` in float64, shapes ``(D,), (D, r), (r, D), (D,)``.
    """
    mu, b, cov_hh, cov_hd = stats.moments()
    A, B = _reduced_rank(cov_hh, cov_hd, rank, ridge)  # noqa: N806
    return mu, A, B, b


def solve_linear(stats: UpdateStats, rank: int, ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank ridge regression of ``dh`` on ``y`` through the origin: ``dh ~ y A B``.

    The statistics' input is the writer output ``y`` (see :class:`LinearEmulator`). No
    intercept and no centring, so that ``y (I + A B)`` is a linear map that folds into the
    writer's projection: the same fit as :func:`solve_lowrank` on the raw second moments
    ``E[y y^T]`` and ``E[y dh^T]``.

    Args:
        stats: Moments of the writer's outputs and the unit's updates.
        rank: ``r``; ``0`` or more than ``D`` means ``D`` (full rank).
        ridge: Relative ridge: ``lam = ridge * trace(E[y y^T]) / D``.

    Returns:
        ``(A, B)`` in float64, shapes ``(D, r)`` and ``(r, D)``.
    """
    mu, b, cov_hh, cov_hd = stats.moments()
    raw_hh = cov_hh + torch.outer(mu, mu)
    raw_hd = cov_hd + torch.outer(mu, b)
    return _reduced_rank(raw_hh, raw_hd, rank or raw_hh.shape[0], ridge)


def _reduced_rank(s_hh: torch.Tensor, s_hd: torch.Tensor, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` minimising ``tr((M^T s_hh M) - 2 M^T s_hd) + lam ||M||^2`` over ``M = A B`` of rank ``<= rank``."""
    if rank < 1:
        raise InputError(f"rank must be at least 1, got {rank}")
    if ridge < 0 or not math.isfinite(ridge):
        raise InputError(f"ridge must be a finite number >= 0, got {ridge}")
    d = s_hh.shape[0]
    if rank > d:
        logger.warning("rank %d is more than the width %d; using %d", rank, d, d)
        rank = d
    lam = ridge * float(torch.trace(s_hh)) / d
    reg = s_hh + lam * torch.eye(d, dtype=s_hh.dtype, device=s_hh.device)
    W = _solve_psd(reg, s_hd)  # (D, D)  # noqa: N806
    if rank == d:
        return W, torch.eye(d, dtype=W.dtype, device=W.device)
    fitted = s_hd.T @ W  # = W^T (s_hh + lam I) W, the fitted values' (augmented) Gram matrix
    fitted = (fitted + fitted.T) / 2
    _, vecs = torch.linalg.eigh(fitted)  # ascending eigenvalues
    V = vecs[:, -rank:].flip(-1)  # (D, r) top right singular vectors  # noqa: N806
    # An eigenvector's sign is arbitrary and differs between LAPACK and cuSOLVER; A B does
    # not depend on it, but saved factors should: the largest entry of each column is made
    # positive, so the same statistics give the same files on every device.
    pivot = V.gather(0, V.abs().argmax(0, keepdim=True))  # (1, r)
    V = V * torch.where(pivot < 0, -1.0, 1.0).to(V.dtype)  # noqa: N806
    return W @ V, V.T.contiguous()


def _solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^-1 b`` for symmetric positive semi-definite ``a``, via the pseudo-inverse when singular."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    logger.info("input covariance is singular (add ridge to avoid this); using the least-norm solution")
    return torch.linalg.lstsq(a, b, driver="gelsd" if a.device.type == "cpu" else None).solution


# --------------------------------------------------------------------------- collection


@dataclass(frozen=True)
class EmulationConfig:
    """How to fit emulated updates.

    Attributes:
        ridge: Relative ridge of low-rank fits: ``lam = ridge * trace(cov(h)) / D``.
        batch_size: Sequences per forward pass.
        show_progress: Show a progress bar on a terminal.
    """

    ridge: float = DEFAULT_RIDGE
    batch_size: int = 8
    show_progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not (
            math.isfinite(self.ridge) and self.ridge >= 0
        ):
            raise InputError(f"ridge {self.ridge!r} is invalid; expected a finite number >= 0 (default {DEFAULT_RIDGE})")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch size {self.batch_size!r} is invalid; expected a whole number >= 1")


class _StopForward(Exception):
    """Raised by a hook after the last layer that holds a unit, to skip the rest of the model."""


@dataclass
class UpdateCollector:
    """Hooks that feed :class:`UpdateStats` of many units from forward passes.

    Each unit's input and update are those of :meth:`depthprune.stream.LayerStreams.passage`,
    except that a unit in ``writers`` takes that writer's output as its input (the ``y``
    of :class:`LinearEmulator`).

    Args:
        layout: The model and its family spec.
        wanted: Unit -> whether its ``D x D`` second moments are needed.
        writers: Unit -> the writer whose output stands for its input.
        stop_early: Stop the forward pass after the last layer that holds a unit.
    """

    layout: ModelLayout
    wanted: dict[Unit, bool]
    writers: dict[Unit, Writer] = field(default_factory=dict)
    stats: dict[Unit, UpdateStats] = field(default_factory=dict)
    stop_early: bool = True
    _select: Any = None
    _handles: list[Any] = field(default_factory=list)
    _outputs: dict[Writer, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dim = int(self.layout.model.config.hidden_size)
        self.stats = {u: UpdateStats(dim, second) for u, second in self.wanted.items()}
        self.last_layer = max((u.index for u in self.wanted), default=-1)

    def attach(self) -> None:
        stream = self.layout.stream
        for i in sorted({u.index for u in self.wanted}):
            units = [u for u in self.wanted if u.index == i]
            kinds = [u.kind for u in units if u.kind != "block"]
            done = functools.partial(self._layer_done, i, units)
            self._handles.extend(stream.record(self.layout.layers[i], kinds, done))
        for writer in sorted(set(self.writers.values())):
            keep = functools.partial(self._outputs.__setitem__, writer)
            self._handles.append(stream.on_writer(self.layout.model, self.layout.layers, writer, keep))

    def _layer_done(self, i: int, units: list[Unit], streams: LayerStreams) -> None:
        for unit in units:
            passage = streams.passage(unit.kind, self._select)  # (M, D) tensors
            writer = self.writers.get(unit)
            entering = passage.entering if writer is None else self._select(self._outputs[writer])
            self._add(unit, entering, passage.update)
        if self.stop_early and i == self.last_layer:
            self._outputs.clear()
            raise _StopForward

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def set_tokens(self, attention_mask: torch.Tensor) -> None:
        mask = attention_mask.bool()
        if bool(mask.all()):
            self._select = lambda x: x.reshape(-1, x.shape[-1])
        else:
            # Under a device map the layers sit on several GPUs: index where x lives.
            self._select = lambda x: x[mask.to(x.device)]

    def _add(self, unit: Unit, h: torch.Tensor, dh: torch.Tensor) -> None:
        if not bool(torch.isfinite(dh).all()):
            raise InputError(
                f"non-finite activations at {unit}: the model's weights or dtype are broken; "
                "check the checkpoint, or try --dtype float32"
            )
        self.stats[unit].add(h, dh)


@torch.no_grad()
def collect_updates(
    model: nn.Module,
    data: TokenBatches,
    units: Mapping[Unit, bool] | Iterable[Unit],
    *,
    spec: ArchSpec | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    writers: Mapping[Unit, Writer] | None = None,
) -> dict[Unit, UpdateStats]:
    """One pass over ``data`` that returns the update statistics of every unit.

    Args:
        model: The unpruned model.
        data: Calibration batches.
        units: Units, or unit -> whether its second moments are needed (default: yes).
        spec: The family spec; looked up from ``model.config`` when omitted.
        batch_size: Sequences per forward pass.
        show_progress: Show a progress bar on a terminal.
        writers: Unit -> a writer whose output is recorded as the unit's input instead
            of the stream entering it (for :class:`LinearEmulator` fits).
    """
    layout = ModelLayout.of(model, spec)
    wanted = dict(units) if isinstance(units, Mapping) else {u: True for u in units}
    layout.check_units(wanted)
    collector = UpdateCollector(layout, wanted, dict(writers or {}))
    device = input_device(model)
    collector.attach()
    try:
        for ids, mask in progress(list(data.rank_share().batches(batch_size)), desc="fit emulators", disable=not show_progress):
            collector.set_tokens(mask.to(device))
            with contextlib.suppress(_StopForward):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
    finally:
        collector.detach()
    for unit in sorted(collector.stats):  # the same order on every rank
        collector.stats[unit].all_reduce_()
    return collector.stats


def emulator_from_stats(
    stats: UpdateStats, replace: str, ridge: float = DEFAULT_RIDGE, dtype: torch.dtype | None = None
) -> nn.Module | None:
    """Build the emulator of ``replace`` (``none``, ``bias``, ``lowrank:R``, ``linear:R``) from statistics.

    For ``linear:R`` the statistics' input must be the writer's output (see
    :func:`linear_writers`).
    """
    kind, rank = parse_replace(replace)
    cast = dtype or torch.float32
    if kind == "none":
        return None
    if kind == "bias":
        return BiasEmulator(stats.mean_update().to(cast))
    if kind == "linear":
        A, B = solve_linear(stats, rank, ridge)  # noqa: N806
        return LinearEmulator(A.to(cast), B.to(cast))
    mu, A, B, b = solve_lowrank(stats, rank, ridge)  # noqa: N806
    return LowRankEmulator(mu.to(cast), A.to(cast), B.to(cast), b.to(cast))


def linear_writers(layout: ModelLayout, removed: Iterable[Unit], linear: Iterable[Unit]) -> dict[Unit, Writer]:
    """Unit -> the writer whose output its linear emulator reads, given every removed unit.

    Raises:
        InputError: the writer is the kept MLP beside a removed attention in a parallel
            layer, which runs after the attention, so its output does not exist yet when
            the emulator runs.
    """
    gone = removed_paths(removed)
    out = {}
    for u in linear:
        writer = layout.stream.writer_before(u.kind, u.index, gone)[0]
        if writer.layer == u.index and writer.kind == "mlp":
            raise InputError(
                f"{u} cannot have a linear emulator: it would read {writer}'s output, which this parallel layer "
                f"computes after the attention; use bias or lowrank:R for {u}, or remove block.{u.index}"
            )
        out[u] = writer
    return out


def fit_emulators(
    model: nn.Module,
    data: TokenBatches,
    plan: Mapping[Unit, str] | Iterable[tuple[Unit, str]],
    config: EmulationConfig | None = None,
    spec: ArchSpec | None = None,
) -> dict[Unit, nn.Module | None]:
    """Fit the emulator of every planned unit in one pass over ``data``.

    Args:
        model: The unpruned model; it is not changed.
        data: Calibration batches.
        plan: Unit -> ``none``, ``bias``, ``lowrank:R`` or ``linear:R``. Every unit of the
            plan counts as removed when a linear emulator's writer is found.
        config: Fit options.
        spec: The family spec; looked up from ``model.config`` when omitted.

    Returns:
        Unit -> emulator module in the model's dtype and device (``None`` for ``none``).
    """
    config = config or EmulationConfig()
    entries = dict(plan.items() if isinstance(plan, Mapping) else plan)
    kinds = {u: parse_replace(r)[0] for u, r in entries.items()}
    need = {u: k in ("lowrank", "linear") for u, k in kinds.items() if k != "none"}
    layout = ModelLayout.of(model, spec)
    writers = linear_writers(layout, entries, [u for u, k in kinds.items() if k == "linear"])
    stats = {}
    if need:
        stats = collect_updates(
            model,
            data,
            need,
            spec=layout.spec,
            batch_size=config.batch_size,
            show_progress=config.show_progress,
            writers=writers,
        )
    param = next(model.parameters())
    out: dict[Unit, nn.Module | None] = {}
    for unit, replace in entries.items():
        emulator = emulator_from_stats(stats[unit], replace, config.ridge, param.dtype) if unit in stats else None
        # Built from statistics on the device its layer runs on (one of several under a device map).
        out[unit] = emulator
    logger.info("fitted %d emulators on %d tokens", sum(e is not None for e in out.values()), data.info.n_tokens)
    return out


# --------------------------------------------------------------------------- installing


@contextlib.contextmanager
def emulate(
    model: nn.Module, replacements: Mapping[Unit, nn.Module | None], spec: ArchSpec | None = None
) -> Iterator[Installed]:
    """Inside the block, ``replacements`` stand in for their units; the model is restored exactly on exit."""
    handle = install_(model, replacements, spec)
    try:
        yield handle
    finally:
        handle.remove()


@dataclass(frozen=True)
class RecoverResult:
    """What :func:`recover_` did.

    Attributes:
        replacements: Unit -> emulator (``None`` for plain removal), now in the model.
        handle: Undo handle of the installation.
        n_tokens: Calibration tokens the fit used.
    """

    replacements: dict[Unit, nn.Module | None]
    handle: Installed
    n_tokens: int


def recover_(
    model: nn.Module,
    plan: Mapping[Unit, str] | Iterable[tuple[Unit, str]],
    data: TokenBatches | None,
    config: EmulationConfig | None = None,
    spec: ArchSpec | None = None,
) -> RecoverResult:
    """Fit emulators for ``plan`` and install them (and the plain removals) in place.

    Raises:
        InputError: an emulated unit is planned but no ``data`` is given.
    """
    entries = dict(plan.items() if isinstance(plan, Mapping) else plan)
    emulated = [str(u) for u, r in entries.items() if parse_replace(r)[0] != "none"]
    if emulated and data is None:
        raise InputError(f"{', '.join(emulated)} must be emulated, which needs calibration data; pass --data")
    replacements: dict[Unit, nn.Module | None] = dict.fromkeys(entries)
    if emulated:
        replacements = fit_emulators(model, data, entries, config, spec)  # type: ignore[arg-type]
    handle = install_(model, replacements, spec)
    return RecoverResult(replacements=replacements, handle=handle, n_tokens=data.info.n_tokens if data else 0)
