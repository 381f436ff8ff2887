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

``linear:R``: a unit's input is the output of its writer (the last kept path before it, or
the embeddings), which may run layers earlier. In the fit each batch's writer output is
kept from the writer's layer until the unit's; in the check it is kept per branch state
(the branch's units up to the writer's layer) and batch, and put in the emulator's tap
before the unit's layer runs. A writer in the unit's own layer hands it over during the
call, as in memory. These tensors are held in memory, not in the spill store.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from depthprune.data import TokenBatches
from depthprune.errors import InputError
from depthprune.recover.emulate import (
    EmulationConfig,
    UpdateCollector,
    emulate,
    emulator_from_stats,
    linear_writers,
    parse_replace,
)
from depthprune.recover.emulators import LinearEmulator
from depthprune.recover.select import Decision, record_decision
from depthprune.stream import Writer
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


@torch.no_grad()
def fit_emulators_streamed(
    streamed: StreamedModel,
    data: TokenBatches,
    plan: Mapping[Unit, str],
    config: EmulationConfig | None = None,
) -> dict[Unit, nn.Module | None]:
    """:func:`~depthprune.recover.emulate.fit_emulators` from one streamed pass of the unpruned model.

    A ``linear:R`` unit's input is its writer's output (see :func:`linear_writers`),
    which may come from an earlier layer: each batch's writer outputs are kept from the
    writer's layer until the unit's, then handed to the same collector.

    Returns:
        Unit -> emulator in the checkpoint's dtype, on its device (``None`` for ``none``).

    Raises:
        InputError: a linear emulator whose writer runs after it (see :func:`linear_writers`).
    """
    config = config or EmulationConfig()
    layout = streamed.layout
    kinds = {u: parse_replace(r)[0] for u, r in plan.items()}
    need = {u: k in ("lowrank", "linear") for u, k in kinds.items() if k != "none"}
    layout.check_units(need)
    writers = linear_writers(layout, plan, [u for u, k in kinds.items() if k == "linear"])
    device = streamed.ckpt.device
    stats = {}
    if need:
        collector = UpdateCollector(layout, need, stop_early=False)
        # This rank's share of the sequences, as collect_updates takes it (all of them in one process).
        batches = [(ids, mask) for ids, mask in data.rank_share().batches(config.batch_size)]
        kept: dict[tuple[Writer, int], torch.Tensor] = {}  # (writer, batch) -> its output (B, T, D)

        def keep(writer: Writer, y: torch.Tensor) -> None:
            kept[(writer, streamed.context[1])] = y  # type: ignore[index]
            collector._outputs[writer] = y

        @contextlib.contextmanager
        def tokens(i: int, b: int, batch: Batch) -> Iterator[None]:
            collector.set_tokens(batch[1].to(device))
            collector._outputs.clear()
            collector._outputs.update({w: y for (w, bb), y in kept.items() if bb == b})
            yield

        collector.attach()  # the stream hooks; the writers' are these, which keep every batch's output
        collector.writers = dict(writers)
        handles = [
            layout.stream.on_writer(streamed.model, layout.layers, w, functools.partial(keep, w)) for w in sorted(set(writers.values()))
        ]
        try:
            with streamed.store(_batch_bytes(streamed, batches)) as store:
                streamed.run(batches, [], store, on_trunk=tokens, show_progress=config.show_progress, upto=collector.last_layer)
        finally:
            collector.detach()
            for h in handles:
                h.remove()
            kept.clear()
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
    spec, model, device, layout = streamed.ckpt.spec, streamed.model, streamed.ckpt.device, streamed.layout
    linear = [u for u, e in emulators.items() if isinstance(e, LinearEmulator)]
    writers = linear_writers(layout, emulators, linear)
    # A linear emulator reads its writer's output. A writer in the unit's own layer hands it
    # over during the layer's call (install_'s hook); one in an earlier layer ran at that
    # layer, for the branch's state there: its output is kept per (writer, the branch's
    # items up to the writer's layer, batch) and put in the emulator's tap before the call.
    early = sorted({w for u, w in writers.items() if w.layer < u.index})
    taps: dict[tuple[Writer, frozenset[Standing], int], torch.Tensor] = {}

    def up_to(items: frozenset[Standing], layer: int) -> frozenset[Standing]:
        return frozenset(s for s in items if s.index <= layer)

    def keep(writer: Writer, y: torch.Tensor) -> None:
        _, b, items = streamed.context  # type: ignore[misc]
        taps[(writer, up_to(items, writer.layer), b)] = y

    @contextlib.contextmanager
    def swap(items: list[Standing]) -> Iterator[None]:
        _, b, branch = streamed.context  # type: ignore[misc]
        table = {s.unit: emulators[s.unit] if s.emulated else None for s in items}
        for unit, e in table.items():
            if isinstance(e, LinearEmulator) and writers[unit].layer < unit.index:
                w = writers[unit]
                e.tap.put(taps[(w, up_to(branch, w.layer), b)])
        with emulate(model, table, spec):
            yield

    handles = [layout.stream.on_writer(model, layout.layers, w, functools.partial(keep, w)) for w in early]

    wanted = list(dict.fromkeys(branches))
    step = streamed.config.head_rows
    groups = [(b, slice(r, r + step)) for b, (ids, _) in enumerate(batches) for r in range(0, ids.shape[0], step)]
    with streamed.store(_batch_bytes(streamed, batches)) as store:
        try:
            states = streamed.run(batches, wanted, store, show_progress=show_progress, swap=swap)
        finally:
            for h in handles:
                h.remove()
            taps.clear()
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
            if not record_decision(decisions, unit, current[unit], loss, without):
                current, loss = {**current, unit: None}, without
                rest = todo[k + 1 :]
                break
        todo = rest
    logger.info("held-out check: %d streamed pass(es)", passes)
    return current, decisions
