"""Cooperative games: a value for every coalition of players.

A coalition is an ``int`` bitmask over a game's players (bit ``i`` set: player ``i`` is
present). The bitmask is how estimators and games talk; players themselves stay what
they are (a :class:`~depthprune.units.Unit` in a :class:`ModelGame`, anything hashable
in a :class:`FunctionGame`) and are never turned into strings and back.

Speed. Masking changes nothing before the first masked layer, so the input of layer
``j`` depends only on the mask pattern of layers ``< j``. :class:`ModelGame` keeps, for
the last coalition it evaluated, the input of every layer, and starts the next one at the
first layer whose pattern differs. The coalitions of a round are evaluated together,
sorted lexicographically by their per-layer mask pattern (layer 0 first), so coalitions
that share a prefix follow each other. A round then costs the number of distinct
(layer, prefix pattern) pairs among its coalitions, times the number of sequences,
instead of ``n_layers`` per coalition. Cost is counted in layer-evaluations: layers run
times sequences.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import torch

from depthprune.devices import input_device
from depthprune.distributed import all_reduce_sum, strided
from depthprune.errors import InputError
from depthprune.score.adaptive import PrefixRunner
from depthprune.score.static import NonFiniteError
from depthprune.score.values import ValueFunction
from depthprune.units import ModelLayout, Unit

P = TypeVar("P", bound=Hashable)


class Game(ABC, Generic[P]):
    """A cooperative game: a value for every coalition of ``players``.

    Estimators hand a game a list of coalitions (bitmasks); the game chooses the order
    that is cheapest to evaluate (:meth:`order`), says what that costs (:meth:`cost`) and
    evaluates it (:meth:`evaluate`).
    """

    players: tuple[P, ...]

    @property
    def n_players(self) -> int:
        return len(self.players)

    @property
    def full(self) -> int:
        """The coalition of every player."""
        return (1 << self.n_players) - 1

    def without(self, player: P) -> int:
        """The coalition of every player but ``player``."""
        return self.full & ~(1 << self.players.index(player))

    def order(self, coalitions: Iterable[int]) -> list[int]:
        """The coalitions in the order to evaluate them (each once)."""
        return sorted(set(coalitions))

    @abstractmethod
    def cost(self, ordered: Sequence[int]) -> int:
        """Layer-evaluations that :meth:`evaluate` of ``ordered`` will take."""

    def setup_cost(self) -> int:
        """Layer-evaluations spent once before any coalition (e.g. a reference pass)."""
        return 0

    @abstractmethod
    def evaluate(self, ordered: Sequence[int]) -> list[float]:
        """The value of each coalition, in the given order."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything the values depend on (JSON-able), for checkpoints and provenance."""


class FunctionGame(Game[P]):
    """A game given by a Python function of the set of present players.

    Each evaluation counts as one layer-evaluation.

    Args:
        players: The players (any hashable values, e.g. names).
        fn: ``fn(frozenset_of_present_players) -> value``.
        name: Recorded in :meth:`identity`.
    """

    def __init__(self, players: Sequence[P], fn: Callable[[frozenset[P]], float], name: str = "function") -> None:
        self.players = tuple(players)
        if len(set(self.players)) != len(self.players):
            raise InputError(f"players {list(self.players)} repeat a player; give each player once")
        self.fn = fn
        self.name = name
        self.evaluations = 0

    def cost(self, ordered: Sequence[int]) -> int:
        return len(ordered)

    def evaluate(self, ordered: Sequence[int]) -> list[float]:
        self.evaluations += len(ordered)
        return [float(self.fn(frozenset(p for i, p in enumerate(self.players) if c >> i & 1))) for c in ordered]

    def identity(self) -> dict[str, Any]:
        return {"game": self.name, "players": [str(p) for p in self.players]}


_BITS = {"attn": 1, "mlp": 2}


def _pattern_bits(unit: Unit) -> tuple[int, int]:
    """(layer, mask bits) of a unit: attn is bit 1, mlp bit 2, a block both."""
    return unit.index, sum(_BITS[s.kind] for s in unit.sublayers())


def _shared(a: tuple[int, ...] | None, b: tuple[int, ...]) -> int:
    """Leading layers whose mask pattern is the same in ``a`` and ``b``."""
    if a is None:
        return 0
    d = 0
    while d < len(b) and a[d] == b[d]:
        d += 1
    return d


def require_units(what: str, units: Iterable[Unit]) -> None:
    """Refuse anything but :class:`Unit` objects: names are parsed once, at the boundary."""
    for u in units:
        if not isinstance(u, Unit):
            raise InputError(
                f"{what} must be Unit objects, got {u!r} ({type(u).__name__}); parse names once, e.g. with "
                "depthprune.units.parse_units('attn.0,mlp.0')"
            )


def check_players(layout: ModelLayout, players: Iterable[Unit], absent: Iterable[Unit]) -> tuple[tuple[Unit, ...], tuple[Unit, ...]]:
    """The players and absent units of a model game, checked: units of the model, at
    least one player, none overlapping (a block and its sublayers).

    Raises:
        InputError: any of these fails.
    """
    units, gone = tuple(players), tuple(absent)
    require_units("players", units)
    require_units("absent units", gone)
    layout.check_units([*units, *gone])
    if not units:
        raise InputError("no players given; expected units such as block.0,block.1")
    seen: dict[Unit, Unit] = {}
    for u in [*units, *gone]:
        for s in u.sublayers():
            if s in seen:
                raise InputError(f"units {seen[s]} and {u} overlap (both cover {s}); play blocks or sublayers, not both")
            seen[s] = u
    return units, gone


class ModelGame(Game[Unit]):
    """The game of units of a model: v(coalition) with every other player masked.

    Args:
        layout: The model and its family spec.
        value: The value function (owns the inputs).
        players: Units that play; they must not overlap (a block and its sublayers).
        absent: Units masked in every coalition (already removed).
        batch_size: Sequences per forward pass.
        cache: Reuse the hidden states of the last evaluation from the first layer whose
            mask differs, and sort each round's coalitions to share prefixes. Off, every
            evaluation runs all layers (for comparison; the values are the same).

    Memory: with ``cache`` the game holds every layer's input for one batch.
    """

    def __init__(
        self,
        layout: ModelLayout,
        value: ValueFunction,
        players: Sequence[Unit],
        *,
        absent: Iterable[Unit] = (),
        batch_size: int = 8,
        cache: bool = True,
    ) -> None:
        units, gone = check_players(layout, players, absent)
        self.layout = layout
        self.value = value
        self.players = units
        self.absent = gone
        self.batch_size = batch_size
        self.cache = cache
        self.runner = PrefixRunner(layout)
        self.evaluations = 0
        self._bits = [_pattern_bits(u) for u in units]
        base = [0] * layout.n_layers
        for u in gone:
            layer, bits = _pattern_bits(u)
            base[layer] |= bits
        self._base = tuple(base)
        device = input_device(layout.model)
        batches = value.batches(batch_size)
        self._n_sequences = sum(int(ids.shape[0]) for ids, _ in batches)
        # Under torchrun each rank plays every coalition on its own batches (every
        # size-th, keeping their global index for the value function); evaluate() sums.
        self._batches = [(b, batches[b][0].to(device), batches[b][1].to(device)) for b in strided(len(batches))]
        self._layer_evals = 0
        self._prepared = not value.needs_reference

    @property
    def layer_evals(self) -> int:
        """Layer-evaluations run so far (layers x sequences), over all torchrun ranks."""
        return self._layer_evals

    def masked(self, coalition: int) -> list[Unit]:
        """The units masked in ``coalition``: the absent ones and every player not in it."""
        return [*self.absent, *(u for i, u in enumerate(self.players) if not coalition >> i & 1)]

    def pattern(self, coalition: int) -> tuple[int, ...]:
        """Mask bits per layer (1 = attention masked, 2 = MLP masked) of a coalition.

        Only used to find shared prefixes: two coalitions with equal patterns up to layer
        ``j`` have equal inputs to layer ``j``.
        """
        out = list(self._base)
        for i, (layer, bits) in enumerate(self._bits):
            if not coalition >> i & 1:
                out[layer] |= bits
        return tuple(out)

    def order(self, coalitions: Iterable[int]) -> list[int]:
        unique = set(coalitions)
        if not self.cache:
            return sorted(unique)
        return sorted(unique, key=lambda c: (self.pattern(c), c))

    def cost(self, ordered: Sequence[int]) -> int:
        n_layers = self.layout.n_layers
        if not self.cache:
            return n_layers * len(ordered) * self._n_sequences
        total, prev = 0, None
        for c in ordered:
            pat = self.pattern(c)
            total += n_layers - min(_shared(prev, pat), n_layers - 1)
            prev = pat
        return total * self._n_sequences

    def distinct_states(self, coalitions: Iterable[int]) -> int:
        """Distinct (layer, prefix pattern) pairs among ``coalitions``: the layers a perfect
        cache, holding every prefix ever seen, would still have to run (per sequence)."""
        seen: set[tuple[int, ...]] = set()
        for c in set(coalitions):
            pat = self.pattern(c)
            seen.update(pat[: j + 1] for j in range(self.layout.n_layers))
        return len(seen)

    def setup_cost(self) -> int:
        return self.layout.n_layers * self._n_sequences if self.value.needs_reference else 0

    def prepare(self) -> None:
        """Show the value function the full model's logits, if it needs them."""
        if self._prepared:
            return
        before = self.runner.layer_evals
        for b, ids, mask in self._batches:
            logits, _ = self.runner.run_from(ids, mask, [])
            self.value.reference(b, logits)
        (evals,) = all_reduce_sum([self.runner.layer_evals - before])
        self._layer_evals += round(float(evals))
        self._prepared = True

    @torch.no_grad()
    def evaluate(self, ordered: Sequence[int]) -> list[float]:
        if not ordered:
            return []
        self.prepare()
        n_layers = self.layout.n_layers
        patterns = [self.pattern(c) for c in ordered]
        masked = [self.masked(c) for c in ordered]
        sums = [0.0] * len(ordered)
        weight = 0.0
        before = self.runner.layer_evals
        for b, ids, mask in self._batches:
            states: list[torch.Tensor | None] = [None] * n_layers  # input of each layer, last pattern
            prev: tuple[int, ...] | None = None
            for k, pat in enumerate(patterns):
                start = min(_shared(prev, pat), n_layers - 1) if self.cache else 0
                logits, kept = self.runner.run_from(ids, mask, masked[k], start, states[start], keep=self.cache)
                if self.cache:
                    states[start + 1 :] = kept
                    prev = pat
                s, w = self.value.contribution(b, logits)
                if not math.isfinite(s):
                    raise NonFiniteError(
                        f"the value is not finite with {', '.join(map(str, masked[k])) or 'no units'} masked: the "
                        "model's weights or dtype are broken; check the checkpoint, or try --dtype float32"
                    )
                sums[k] += s
            weight += w  # the same for every coalition
        # Value sums and weights add over ranks' batches (one collective per round).
        *sums_all, weight_all, evals = all_reduce_sum([*sums, weight, self.runner.layer_evals - before])
        self._layer_evals += round(float(evals))
        self.evaluations += len(ordered)
        return [float(s) / float(weight_all) for s in sums_all]

    def identity(self) -> dict[str, Any]:
        config = getattr(self.layout.model, "config", None)
        return {
            "model": getattr(config, "_name_or_path", "") or "",
            "n_layers": self.layout.n_layers,
            "players": [str(u) for u in self.players],
            "absent": [str(u) for u in self.absent],
            "value": self.value.describe(),
            "batch_size": self.batch_size,
            "cache": self.cache,
        }


__all__ = ["FunctionGame", "Game", "ModelGame", "check_players", "require_units"]
