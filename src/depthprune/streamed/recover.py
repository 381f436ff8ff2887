"""Emulator fitting and the held-out keep-or-drop check of ``prune --recover``, layer-streamed.

The same numbers as :func:`~depthprune.recover.emulate.fit_emulators` and
:func:`~depthprune.recover.select.select_emulators`, with the model read one layer at a time:

- **Fit.** The in-memory fitter takes every unit's input and update from one pass of the
  *unpruned* model. Here that pass is the streamed runner's trunk: the same
  :class:`~depthprune.recover.emulate.UpdateCollector` hooks sit on the layers, the same
  batches (``batch_size`` sequences) pass each layer in the same order, so the float64 sums
  are added in the same order. The pass stops after the last layer that holds a unit.
- **Held-out check.** Each decision compares the held-out loss with the emulators as
  decided so far against the same with one unit plainly removed. Those are branches of the
  runner: a branch is the set of removed units, each marked emulated or not
  (:class:`Standing`), and a branch's units are installed at their layer with
  :func:`~depthprune.recover.emulate.emulate`, as in memory. One pass evaluates the current
  set and every remaining unit's trial; the decisions are then walked in order (layer, then
  kind). A drop changes the set that later decisions start from, so the remaining units
  are evaluated again in a new pass: ``1 + (number of drops before the last unit)`` passes,
  each reading every layer once.

``linear:R`` is refused: its statistics pair a unit's update with the output of an earlier
writer (possibly several layers back), which the in-memory hooks keep for one batch at a
time, while a streamed pass runs all batches through a layer before the next.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from depthprune.data import TokenBatches
from depthprune.errors import InputError
from depthprune.recover.emulate import (
    EmulationConfig,
    UpdateCollector,
    describe,
    emulate,
    emulator_from_stats,
    parse_replace,
)
from depthprune.recover.select import Decision
from depthprune.streamed.head import ChunkedLogSumExp
from depthprune.streamed.runner import Batch, StreamedModel
from depthprune.streamed.tasks import _batch_bytes, _logits64
from depthprune.units import Unit

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Standing:
    """A removed unit in a branch of the held-out check: emulated, or plainly removed."""

    unit: Unit
    emulated: bool

    @property
    def index(self) -> int:
        return self.unit.index


def check_stream_recover(plan: Mapping[Unit, str]) -> None:
    """Refuse, in one line, the replacements that streamed fitting does not compute.

    Raises:
        InputError: a ``linear:R`` replacement.
    """
    linear = sorted(str(u) for u, r in plan.items() if parse_replace(r)[0] == "linear")
    if linear:
        raise InputError(
            f"linear:R is not supported with --stream ({', '.join(linear)}); use bias or lowrank:R, or drop --stream"
        )


@torch.no_grad()
def fit_emulators_streamed(
    streamed: StreamedModel,
    data: TokenBatches,
    plan: Mapping[Unit, str],
    config: EmulationConfig | None = None,
) -> dict[Unit, nn.Module | None]:
    """:func:`~depthprune.recover.emulate.fit_emulators` from one streamed pass of the unpruned model.

    Returns:
        Unit -> emulator in the checkpoint's dtype, on its device (``None`` for ``none``).

    Raises:
        InputError: a ``linear:R`` replacement (see :func:`check_stream_recover`).
    """
    config = config or EmulationConfig()
    check_stream_recover(plan)
    kinds = {u: parse_replace(r)[0] for u, r in plan.items()}
    need = {u: k == "lowrank" for u, k in kinds.items() if k != "none"}
    streamed.layout.check_units(need)
    device = streamed.ckpt.device
    stats = {}
    if need:
        collector = UpdateCollector(streamed.layout, need, stop_early=False)
        # This rank's share of the sequences, as collect_updates takes it (all of them in one process).
        batches = [(ids, mask) for ids, mask in data.rank_share().batches(config.batch_size)]

        @contextlib.contextmanager
        def tokens(i: int, b: int, batch: Batch) -> Iterator[None]:
            collector.set_tokens(batch[1].to(device))
            yield

        collector.attach()
        try:
            with streamed.store(_batch_bytes(streamed, batches)) as store:
                streamed.run(batches, [], store, on_trunk=tokens, show_progress=config.show_progress, upto=collector.last_layer)
        finally:
            collector.detach()
        for unit in sorted(collector.stats):  # sums over ranks under torchrun, in the same order on every rank
            collector.stats[unit].all_reduce_()
        stats = collector.stats
    out: dict[Unit, nn.Module | None] = {}
    for unit, replace in plan.items():
        emulator = emulator_from_stats(stats[unit], replace, config.ridge, streamed.ckpt.dtype) if unit in stats else None
        out[unit] = emulator.to(device) if emulator is not None else None
    logger.info("fitted %d emulators on %d tokens (streamed)", sum(e is not None for e in out.values()), data.info.n_tokens)
    return out


def _branch(table: Mapping[Unit, nn.Module | None]) -> frozenset[Standing]:
    return frozenset(Standing(u, e is not None) for u, e in table.items())


@torch.no_grad()
def heldout_losses_streamed(
    streamed: StreamedModel,
    emulators: Mapping[Unit, nn.Module | None],
    branches: Sequence[frozenset[Standing]],
    heldout: TokenBatches,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict[frozenset[Standing], float]:
    """The held-out loss of every branch in one streamed pass.

    The loss is :func:`~depthprune.recover.compare.heldout_loss`'s: the mean next-token
    NLL over the real tokens, here from the chunked LM head folded in float64.

    Args:
        streamed: The unpruned model.
        emulators: Unit -> its fitted emulator (used where a branch marks it emulated).
        branches: Sets of :class:`Standing` units.
        heldout: The held-out sequences.
        batch_size: Sequences per batch.
        show_progress: Show a progress bar on a terminal.
    """
    batches = [(ids, mask) for ids, mask in heldout.batches(batch_size)]
    spec, model, device = streamed.ckpt.spec, streamed.model, streamed.ckpt.device

    def swap(items: list[Standing]) -> contextlib.AbstractContextManager[Any]:
        return emulate(model, {s.unit: emulators[s.unit] if s.emulated else None for s in items}, spec)

    wanted = list(dict.fromkeys(branches))
    step = streamed.config.head_rows
    groups = [(b, slice(r, r + step)) for b, (ids, _) in enumerate(batches) for r in range(0, ids.shape[0], step)]
    with streamed.store(_batch_bytes(streamed, batches)) as store:
        states = streamed.run(batches, wanted, store, show_progress=show_progress, swap=swap)
        acc = {br: [ChunkedLogSumExp(batches[b][0][rows, 1:].to(device)) for b, rows in groups] for br in wanted}
        with streamed.output_stage():
            for start, chunk in streamed.head_chunks():
                for g, (b, rows) in enumerate(groups):
                    mask = batches[b][1][rows].to(device)
                    for br in wanted:
                        x = _logits64(streamed, store.get((states[br], b))[rows], mask, chunk)[:, :-1]  # (R, T-1, C)
                        acc[br][g].add(start, x)
                        del x
                del chunk
    losses: dict[frozenset[Standing], float] = {}
    for br in wanted:
        total, count = 0.0, 0
        for (b, rows), lse in zip(groups, acc[br], strict=True):
            mask = batches[b][1][rows].to(device)
            valid = (mask[:, 1:] * mask[:, :-1]).bool()  # (R, T-1), as heldout_loss
            total += float(lse.nll[valid].sum())
            count += int(valid.sum())
        if count == 0:
            raise InputError("the evaluation data has no scored tokens; give longer sequences")
        loss = total / count
        if not torch.isfinite(torch.tensor(loss)):
            raise InputError("the held-out loss is not finite: the model's weights or dtype are broken; try --dtype float32")
        losses[br] = loss
    return losses


def select_emulators_streamed(
    streamed: StreamedModel,
    replacements: Mapping[Unit, nn.Module | None],
    heldout: TokenBatches,
    batch_size: int = 8,
    show_progress: bool = True,
) -> tuple[dict[Unit, nn.Module | None], dict[Unit, Decision]]:
    """:func:`~depthprune.recover.select.select_emulators` of a streamed model: the same decisions.

    Units are visited in order (layer, then kind); each one's emulator is compared with
    its plain removal, the others standing in as decided so far. One streamed pass gives
    the current set's loss and every remaining unit's trial; after a drop the remaining
    units are evaluated again from the new set.

    Returns:
        ``(kept, decisions)`` as :func:`~depthprune.recover.select.select_emulators`.
    """
    fitted = dict(replacements)
    current = dict(replacements)
    todo = sorted((u for u, e in current.items() if e is not None), key=lambda u: (u.index, u.kind))
    decisions: dict[Unit, Decision] = {}
    loss: float | None = None
    passes = 0
    while todo:
        base = _branch(current)
        trials = {u: _branch({**current, u: None}) for u in todo}
        losses = heldout_losses_streamed(streamed, fitted, [base, *trials.values()], heldout, batch_size, show_progress)
        passes += 1
        if loss is None:
            loss = losses[base]
        rest: list[Unit] = []
        for k, unit in enumerate(todo):
            without = losses[trials[unit]]
            keep = loss < without
            decisions[unit] = Decision(describe(current[unit]), keep, loss, without)
            logger.info(
                "%s: held-out loss %.4f with its %s emulator, %.4f without: %s",
                unit, loss, decisions[unit].replace, without, "keep" if keep else "drop",
            )
            if not keep:
                current, loss = {**current, unit: None}, without
                rest = todo[k + 1 :]
                break
        todo = rest
    logger.info("held-out check: %d streamed pass(es)", passes)
    return current, decisions
