"""Keep an emulator only where it beats plain removal on held-out calibration sequences.

Emulation can hurt: fitted on few tokens, a bias or a low-rank map may move the stream
further from where the next layers expect it than plain removal does (on stories260K,
bias for ``attn.0`` and rank-4 low-rank for ``mlp.0``). ``prune --recover`` therefore
holds out the last part of its calibration sequences (:func:`split_tail`), fits on the
rest, and checks every emulator on the held-out part (:func:`select_emulators`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from depthprune.architectures import ArchSpec
from depthprune.data import TokenBatches
from depthprune.errors import InputError
from depthprune.progress import counter
from depthprune.recover.compare import heldout_loss, subset
from depthprune.recover.emulate import describe, emulate
from depthprune.units import Unit

logger = logging.getLogger(__name__)

DEFAULT_HELDOUT = 0.2


def split_tail(data: TokenBatches, fraction: float) -> tuple[TokenBatches, TokenBatches | None]:
    """Split off the last ``ceil(fraction * N)`` sequences as a held-out set (deterministic).

    Returns:
        ``(fit, heldout)``; ``heldout`` is ``None`` when ``fraction`` is 0 or there are
        fewer than two sequences (nothing is then held out).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise InputError(f"held-out fraction {fraction!r} is invalid; expected a number in [0, 1), e.g. 0.2")
    n = len(data)
    k = math.ceil(fraction * n)
    if k == 0 or n < 2:
        return data, None
    k = min(k, n - 1)
    idx = torch.arange(n, device=data.input_ids.device)  # indexes the token tensors where they are
    return subset(data, idx[: n - k], "fit"), subset(data, idx[n - k :], "heldout")


@dataclass(frozen=True)
class Decision:
    """Whether one unit keeps its emulator, and the held-out losses that decided it.

    Attributes:
        replace: The emulator (``bias``, ``lowrank:R``, ``linear:R``).
        keep: Whether ``loss_with < loss_without``.
        loss_with: Held-out loss with this emulator (and the others still kept).
        loss_without: The same with this unit plainly removed instead.
    """

    replace: str
    keep: bool
    loss_with: float
    loss_without: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "replace": self.replace,
            "decision": "keep" if self.keep else "drop",
            "heldout_loss_with": self.loss_with,
            "heldout_loss_without": self.loss_without,
        }


def record_decision(decisions: dict[Unit, Decision], unit: Unit, emulator: Any, loss: float, without: float) -> bool:
    """Decide ``unit`` and record it: its emulator stays only where the held-out loss is lower with it.

    Args:
        decisions: Filled in with ``unit``'s :class:`Decision`.
        unit: The unit being checked.
        emulator: Its fitted emulator (described in the decision).
        loss: Held-out loss with the current emulators, ``unit``'s included.
        without: The same with ``unit`` plainly removed instead.

    Returns:
        Whether the emulator is kept.
    """
    keep = loss < without
    decisions[unit] = Decision(describe(emulator), keep, loss, without)
    logger.info(
        "%s: held-out loss %.4f with its %s emulator, %.4f without: %s",
        unit, loss, decisions[unit].replace, without, "keep" if keep else "drop",
    )
    return keep


def select_emulators(
    model: nn.Module,
    replacements: Mapping[Unit, nn.Module | None],
    heldout: TokenBatches,
    spec: ArchSpec | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> tuple[dict[Unit, nn.Module | None], dict[Unit, Decision]]:
    """Drop every emulator that does not lower the held-out loss, one unit at a time.

    Units are visited in order (layer, then kind). Each one's emulator is compared with
    plain removal of that unit, the other units standing in as decided so far (emulators
    not yet visited still in place); a drop is carried into the next comparisons. So the
    held-out loss never rises from one decision to the next, and the final model's loss is
    the last decision's smaller loss.

    Args:
        model: The unpruned model; it is left unchanged.
        replacements: Unit -> emulator, or ``None`` for plain removal.
        heldout: Sequences that no emulator was fitted on.
        spec: The family spec; looked up from ``model.config`` when omitted.
        batch_size: Sequences per forward pass.
        show_progress: Show a progress bar on a terminal.

    Returns:
        ``(kept, decisions)``: the replacements with dropped emulators set to ``None``,
        and unit -> :class:`Decision` for every unit that had an emulator.
    """
    current = dict(replacements)
    units = sorted((u for u, e in current.items() if e is not None), key=lambda u: (u.index, u.kind))
    decisions: dict[Unit, Decision] = {}
    if not units:
        return current, decisions
    with counter(len(units) + 1, desc="check emulators", disable=not show_progress) as bar:
        with emulate(model, current, spec):
            loss = heldout_loss(model, heldout, batch_size)
        bar.update()
        for unit in units:
            trial = {**current, unit: None}
            with emulate(model, trial, spec):
                without = heldout_loss(model, heldout, batch_size)
            if not record_decision(decisions, unit, current[unit], loss, without):
                current, loss = trial, without
            bar.update()
    return current, decisions
