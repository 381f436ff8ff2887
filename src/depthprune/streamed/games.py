"""The Shapley game of a streamed model: a round of coalitions is one streamed pass.

:class:`StreamedGame` is the :class:`~depthprune.score.shapley.games.ModelGame` of a model
run layer by layer from its checkpoint. The estimators hand a game a whole round of
coalitions at once (:meth:`~depthprune.score.shapley.games.Game.evaluate`); here each
coalition is a branch (the units it masks) of one :meth:`StreamedModel.run`, so every
layer is read once per round, however many coalitions the round holds, and the LM head
once, in vocabulary chunks. The values are those of
:class:`~depthprune.score.values.LossValue` and :class:`~depthprune.score.values.KLValue`,
computed from the chunked head in float64 (:func:`branch_token_losses`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from depthprune.distributed import all_reduce_sum, strided
from depthprune.errors import InputError
from depthprune.score.shapley.games import Game, check_players
from depthprune.score.static import NonFiniteError
from depthprune.score.values import ValueFunction
from depthprune.streamed.runner import Branch, StreamedModel, branch_of
from depthprune.streamed.tasks import (
    _batch_bytes,
    branch_token_losses,
    next_token_valid,
)
from depthprune.units import Unit

STREAMED_VALUES = ("loss", "kl")


def check_stream_value(value: ValueFunction | str) -> None:
    """Refuse, in one line, a value function that the streamed game does not compute.

    Raises:
        InputError: a value other than ``loss`` and ``kl``.
    """
    name = value if isinstance(value, str) else value.name
    if name not in STREAMED_VALUES:
        raise InputError(
            f"value {name!r} is not supported with --stream; streamed Shapley computes the {' and '.join(STREAMED_VALUES)} "
            f"values (run --value {name} without --stream)"
        )


class StreamedGame(Game[Unit]):
    """v(coalition) of a streamed model, with every player outside the coalition masked.

    Args:
        streamed: The model.
        value: A ``loss`` or ``kl`` value function (it owns the calibration batches).
        players: Units that play; they must not overlap (a block and its sublayers).
        absent: Units masked in every coalition (already removed).
        batch_size: Sequences per batch.

    Raises:
        InputError: another value function, or bad players.
    """

    def __init__(
        self,
        streamed: StreamedModel,
        value: ValueFunction,
        players: Sequence[Unit],
        *,
        absent: Iterable[Unit] = (),
        batch_size: int = 8,
    ) -> None:
        check_stream_value(value)
        self.players, self.absent = check_players(streamed.layout, players, absent)
        self.streamed = streamed
        self.value = value
        self.batch_size = batch_size
        self.evaluations = 0
        self.rounds = 0  # streamed passes, one per evaluate() call
        self._kl = value.needs_reference
        batches = list(value.batches(batch_size))
        self._n_sequences = sum(int(ids.shape[0]) for ids, _ in batches)
        # Under torchrun each rank runs every coalition on its share of the batches
        # (every size-th), and evaluate() sums over ranks, as ModelGame does.
        self._batches = [batches[b] for b in strided(len(batches))]

    def masked(self, coalition: int) -> list[Unit]:
        """The units masked in ``coalition``: the absent ones and every player not in it."""
        return [*self.absent, *(u for i, u in enumerate(self.players) if not coalition >> i & 1)]

    def _branches(self, ordered: Sequence[int]) -> list[Branch]:
        branches = [branch_of(self.masked(c)) for c in ordered]
        return [*branches, frozenset()] if self._kl else branches  # KL needs the unmasked model's logits

    def cost(self, ordered: Sequence[int]) -> int:
        """Layer-evaluations of the round's pass: at each layer, one per distinct prefix of
        masks up to that layer among the round's branches (the unmasked model too for
        ``kl``), times the sequences."""
        if not ordered:
            return 0
        branches = self._branches(ordered)
        states = {(i, frozenset(u for u in br if u.index <= i)) for br in branches for i in range(self.streamed.n_layers)}
        return len(states) * self._n_sequences

    @torch.no_grad()
    def evaluate(self, ordered: Sequence[int]) -> list[float]:
        if not ordered:
            return []
        streamed, batches = self.streamed, self._batches
        branches = self._branches(ordered)
        reference = frozenset() if self._kl else None
        losses: dict[Branch, list[tuple[torch.Tensor, torch.Tensor | None]]] = {br: [] for br in branches}
        if batches:  # a torchrun rank may have none
            with streamed.store(_batch_bytes(streamed, batches)) as store:
                states = streamed.run(batches, branches, store, show_progress=False)
                losses = branch_token_losses(streamed, batches, states, store, reference)
        valid = [next_token_valid(mask.to(streamed.ckpt.device)) for _, mask in batches]  # (B, T-1) each
        sums = []
        for br in branches[: len(ordered)]:
            # The value is minus the mean over valid tokens of the NLL (loss) or the KL (kl).
            per_token = [(kl if self._kl else nll) for nll, kl in losses[br]]
            sums.append(math.fsum(float((x * v).sum()) for x, v in zip(per_token, valid, strict=True)))  # type: ignore[operator]
        # Sums over ranks, never means; the weight is the same for every coalition.
        *totals, weight = (float(t) for t in all_reduce_sum([*sums, math.fsum(float(v.sum()) for v in valid)]))
        values = []
        for c, total in zip(ordered, totals, strict=True):
            if not math.isfinite(total):
                raise NonFiniteError(
                    f"the value is not finite with {', '.join(map(str, self.masked(c))) or 'no units'} masked: the "
                    "model's weights or dtype are broken; check the checkpoint, or try --dtype float32"
                )
            values.append(-total / weight)
        self.evaluations += len(ordered)
        self.rounds += 1
        return values

    def identity(self) -> dict[str, Any]:
        config = getattr(self.streamed.model, "config", None)
        return {
            "model": getattr(config, "_name_or_path", "") or "",
            "n_layers": self.streamed.n_layers,
            "players": [str(u) for u in self.players],
            "absent": [str(u) for u in self.absent],
            "value": self.value.describe(),
            "batch_size": self.batch_size,
            "execution": "layer-streamed",
        }


__all__ = ["STREAMED_VALUES", "StreamedGame", "check_stream_value"]
