"""Shapley values of units: exact enumeration, antithetic permutation sampling, local sampling.

The players are units (``block.i``, or ``attn.i``/``mlp.i``); a coalition is the set of
units that are present, and every other player is masked. A coalition is an ``int``
bitmask over the players: bit ``i`` set means player ``i`` is present.

Speed. Masking changes nothing before the first masked layer, so the input of layer
``j`` depends only on the mask pattern of layers ``< j``. :class:`ModelGame` keeps, for
the last coalition it evaluated, the input of every layer, and starts the next one at the
first layer whose pattern differs. The coalitions of a round are evaluated together,
sorted lexicographically by their per-layer mask pattern (layer 0 first), so coalitions
that share a prefix follow each other. A round then costs the number of distinct
(layer, prefix pattern) pairs among its coalitions, times the number of sequences,
instead of ``n_layers`` per coalition. (Walking one permutation costs the same in any
order, since each player changes once; the saving comes from the prefixes that the
chains of a round share: early layers have few distinct patterns.) The permutation
estimator's default cyclic rounds also share coalitions between their pairs, and every
evaluated coalition's value is kept (a memo), so none is evaluated twice. Cost is counted
in layer-evaluations: layers run times sequences.

Resume. A run with a checkpoint path writes, after every round, the seed, the settings,
the round counter (round ``r`` draws from a generator seeded by ``(seed, r)``), the
running sums and the memo. Rerun with ``resume=True`` it continues from the last round
and gives the same values, samples and cost as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from depthprune import __version__
from depthprune._fs import write_json_atomic
from depthprune.errors import CheckpointError, InputError, check_choice
from depthprune.progress import counter
from depthprune.registry import Registry
from depthprune.score.adaptive import PrefixRunner
from depthprune.score.registry import DEEPER_LOOK
from depthprune.score.static import NonFiniteError
from depthprune.score.values import ValueFunction
from depthprune.units import SUBLAYER_KINDS, UNIT_KINDS, ModelLayout, Unit

logger = logging.getLogger(__name__)

MAX_EXACT_PLAYERS = 12
EXACT_CHUNK = 256  # coalitions per round of exact enumeration (one checkpoint each)
CHECKPOINT_KIND = "depthprune-shapley-checkpoint"
DESIGNS = ("cyclic", "independent")

SHAPLEY_1953 = "Shapley 1953, A value for n-person games (Contributions to the Theory of Games II)"
CASTRO_2009 = "Castro, Gomez and Tejada 2009, Polynomial calculation of the Shapley value based on sampling (Computers & OR 36(5))"
ANTITHETIC = "Mitchell et al. 2022, Sampling permutations for Shapley value estimation (JMLR 23)"
MALEKI_2013 = "Maleki et al. 2013, Bounding the estimation error of sampling-based Shapley value approximation (arXiv 1306.4265)"


# --------------------------------------------------------------------------- games


class Game(ABC):
    """A cooperative game: a value for every coalition of ``players``.

    Estimators hand a game a list of coalitions (bitmasks); the game chooses the order
    that is cheapest to evaluate (:meth:`order`), says what that costs (:meth:`cost`) and
    evaluates it (:meth:`evaluate`).
    """

    players: tuple[str, ...]

    @property
    def n_players(self) -> int:
        return len(self.players)

    @property
    def full(self) -> int:
        """The coalition of every player."""
        return (1 << self.n_players) - 1

    def order(self, coalitions: Iterable[int]) -> list[int]:
        """The coalitions in the order to evaluate them."""
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
        """Everything the values depend on, for checkpoints and provenance."""


class FunctionGame(Game):
    """A game given by a Python function of the set of present players' names.

    Each evaluation counts as one layer-evaluation.

    Args:
        players: Player names.
        fn: ``fn(frozenset_of_present_names) -> value``.
        name: Recorded in :meth:`identity`.
    """

    def __init__(self, players: Sequence[str], fn: Callable[[frozenset[str]], float], name: str = "function") -> None:
        self.players = tuple(players)
        if len(set(self.players)) != len(self.players):
            raise InputError(f"players {list(self.players)} repeat a name; give each player once")
        self.fn = fn
        self.name = name
        self.evaluations = 0

    def cost(self, ordered: Sequence[int]) -> int:
        return len(ordered)

    def evaluate(self, ordered: Sequence[int]) -> list[float]:
        self.evaluations += len(ordered)
        return [float(self.fn(frozenset(p for i, p in enumerate(self.players) if c >> i & 1))) for c in ordered]

    def identity(self) -> dict[str, Any]:
        return {"game": self.name, "players": list(self.players)}


_BITS = {"attn": 1, "mlp": 2}


def _pattern_bits(unit: Unit) -> tuple[int, int]:
    """(layer, mask bits) of a unit: attn is bit 1, mlp bit 2, a block both."""
    return unit.index, sum(_BITS[s.kind] for s in unit.sublayers())


class ModelGame(Game):
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
        players: Sequence[Unit | str],
        *,
        absent: Iterable[Unit | str] = (),
        batch_size: int = 8,
        cache: bool = True,
    ) -> None:
        n_layers = layout.n_layers
        units = [u if isinstance(u, Unit) else Unit.parse(u, n_layers) for u in players]
        gone = [u if isinstance(u, Unit) else Unit.parse(u, n_layers) for u in absent]
        layout.check_units([*units, *gone])
        if not units:
            raise InputError("no players given; expected units such as block.0,block.1")
        seen: dict[Unit, Unit] = {}
        for u in [*units, *gone]:
            for s in u.sublayers():
                if s in seen:
                    raise InputError(
                        f"units {seen[s]} and {u} overlap (both cover {s}); play blocks or sublayers, not both"
                    )
                seen[s] = u
        self.layout = layout
        self.value = value
        self.units = tuple(units)
        self.absent = tuple(gone)
        self.players = tuple(str(u) for u in units)
        self.batch_size = batch_size
        self.cache = cache
        self.runner = PrefixRunner(layout)
        self.evaluations = 0
        self._bits = [_pattern_bits(u) for u in units]
        base = [0] * n_layers
        for u in gone:
            layer, bits = _pattern_bits(u)
            base[layer] |= bits
        self._base = tuple(base)
        device = next(layout.model.parameters()).device
        self._batches = [(ids.to(device), mask.to(device)) for ids, mask in value.batches(batch_size)]
        self._n_sequences = sum(int(ids.shape[0]) for ids, _ in self._batches)
        self._prepared = not value.needs_reference

    @property
    def layer_evals(self) -> int:
        """Layer-evaluations run so far (layers x sequences)."""
        return self.runner.layer_evals

    def pattern(self, coalition: int) -> tuple[int, ...]:
        """Mask bits per layer (1 = attention masked, 2 = MLP masked) of a coalition."""
        out = list(self._base)
        for i, (layer, bits) in enumerate(self._bits):
            if not coalition >> i & 1:
                out[layer] |= bits
        return tuple(out)

    @staticmethod
    def _masked(pattern: tuple[int, ...]) -> list[Unit]:
        return [Unit(k, j) for j, bits in enumerate(pattern) for k in SUBLAYER_KINDS if bits & _BITS[k]]  # type: ignore[arg-type]

    @staticmethod
    def _shared(a: tuple[int, ...] | None, b: tuple[int, ...]) -> int:
        """Leading layers whose mask pattern is the same in ``a`` and ``b``."""
        if a is None:
            return 0
        d = 0
        while d < len(b) and a[d] == b[d]:
            d += 1
        return d

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
            total += n_layers - min(self._shared(prev, pat), n_layers - 1)
            prev = pat
        return total * self._n_sequences

    def setup_cost(self) -> int:
        return self.layout.n_layers * self._n_sequences if self.value.needs_reference else 0

    def prepare(self) -> None:
        """Show the value function the full model's logits, if it needs them."""
        if self._prepared:
            return
        for b, (ids, mask) in enumerate(self._batches):
            logits, _ = self.runner.run_from(ids, mask, [])
            self.value.reference(b, logits)
        self._prepared = True

    @torch.no_grad()
    def evaluate(self, ordered: Sequence[int]) -> list[float]:
        if not ordered:
            return []
        self.prepare()
        n_layers = self.layout.n_layers
        patterns = [self.pattern(c) for c in ordered]
        masked = [self._masked(p) for p in patterns]
        sums = [0.0] * len(ordered)
        weight = 0.0
        for b, (ids, mask) in enumerate(self._batches):
            states: list[torch.Tensor | None] = [None] * n_layers  # input of each layer, last pattern
            prev: tuple[int, ...] | None = None
            for k, pat in enumerate(patterns):
                start = min(self._shared(prev, pat), n_layers - 1) if self.cache else 0
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
        self.evaluations += len(ordered)
        return [s / weight for s in sums]

    def identity(self) -> dict[str, Any]:
        config = getattr(self.layout.model, "config", None)
        return {
            "model": getattr(config, "_name_or_path", "") or "",
            "n_layers": self.layout.n_layers,
            "players": list(self.players),
            "absent": [str(u) for u in self.absent],
            "value": self.value.describe(),
            "batch_size": self.batch_size,
            "cache": self.cache,
        }


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ShapleyConfig:
    """How to estimate Shapley values.

    Attributes:
        estimator: ``exact``, ``permutation`` or ``local`` (see ``ESTIMATORS``).
        tol: Stop once every player's standard error is below this (in the value's units).
        budget: Stop before the layer-evaluations (layers x sequences) would exceed this.
        max_samples: Stop after this many samples: antithetic permutation pairs
            (``permutation``) or coalitions (``local``); the estimator's default if unset.
        min_samples: Samples needed before ``tol`` may stop a run.
        round_size: Samples drawn and evaluated together (sorted to share prefixes, one
            checkpoint each); the estimator's default if unset.
        local_k: Units removed in each coalition of ``local``; ``max(1, n // 4)`` if unset.
        design: For ``permutation``: ``cyclic`` rounds of the ``n`` cyclic shifts of a random
            permutation (stratified by position; samples count pairs, ``n`` per round), or
            ``independent`` pairs.
        seed: Seeds the sampling; round ``r`` draws from a generator seeded by ``(seed, r)``.
        batch_size: Sequences per forward pass.
        cache: Reuse cached prefixes and sort coalitions to share them (off only to compare).
    """

    estimator: str = "permutation"
    tol: float | None = None
    budget: int | None = None
    max_samples: int | None = None
    min_samples: int = 4
    round_size: int | None = None
    local_k: int | None = None
    design: Literal["cyclic", "independent"] = "cyclic"
    seed: int = 0
    batch_size: int = 8
    cache: bool = True

    def __post_init__(self) -> None:
        get_estimator(self.estimator)
        if self.tol is not None and not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol > 0):
            raise InputError(f"tol {self.tol!r} is invalid; expected a positive number such as 0.01")
        for name in ("budget", "max_samples", "round_size", "local_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} {value!r} is invalid; expected a whole number >= 1 or nothing")
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) or self.min_samples < 2:
            raise InputError(f"min_samples {self.min_samples!r} is invalid; a standard error needs at least 2 samples")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        check_choice(self.design, DESIGNS, "design")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- estimators


class Estimator(ABC):
    """Draws samples, names the coalitions each needs, and turns their values into estimates.

    All state lives in a JSON-able ``dict`` so that it can be checkpointed.
    """

    default_round: ClassVar[int] = 1
    default_max_samples: ClassVar[int | None] = None
    sampled: ClassVar[bool] = True  # False: max_samples and tol do not apply

    def __init__(self, game: Game, config: ShapleyConfig) -> None:
        self.game = game
        self.config = config
        self.n = game.n_players

    @abstractmethod
    def new_state(self) -> dict[str, Any]:
        """The state before any sample."""

    @abstractmethod
    def draw(self, state: dict[str, Any], rng: np.random.Generator, count: int) -> list[Any]:
        """Up to ``count`` new samples (JSON-able)."""

    @abstractmethod
    def coalitions(self, sample: Any) -> list[int]:
        """The coalitions whose values ``sample`` needs."""

    @abstractmethod
    def update(self, state: dict[str, Any], sample: Any, memo: dict[int, float]) -> None:
        """Add one evaluated sample to the running sums."""

    @abstractmethod
    def estimate(self, state: dict[str, Any], memo: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
        """Values and standard errors ``(n,)`` from the state."""

    def finished(self, state: dict[str, Any]) -> bool:
        """Whether there is nothing left to sample."""
        return False

    def details(self, state: dict[str, Any], memo: dict[int, float]) -> dict[str, np.ndarray]:
        """Further per-player numbers worth keeping with the result."""
        return {}

    def pairs_in(self, sample: Any) -> int:
        """How many samples (as counted by ``max_samples``) one drawn sample is."""
        return 1

    def min_samples_for_tol(self) -> int:
        """Samples needed before standard errors are trusted to stop a run."""
        return self.config.min_samples

    def stderr_note(self) -> str:
        return "Monte Carlo standard error of the estimator"


@dataclass(frozen=True)
class EstimatorSpec:
    """One registered estimator, with the paper it comes from."""

    name: str
    description: str
    reference: str
    cls: type[Estimator]


ESTIMATORS: Registry[EstimatorSpec] = Registry("estimator")


def register_estimator(name: str, description: str, reference: str) -> Callable[[type[Estimator]], type[Estimator]]:
    """Register the decorated :class:`Estimator` subclass under ``name``."""

    def add(cls: type[Estimator]) -> type[Estimator]:
        ESTIMATORS.add(name, EstimatorSpec(name, description, reference, cls))
        return cls

    return add


def get_estimator(name: str) -> EstimatorSpec:
    """Look an estimator up, suggesting the closest name on a miss."""
    return ESTIMATORS.get(name)


def shapley_weights(n: int) -> np.ndarray:
    """``w[s] = s! (n-s-1)! / n!``: the weight of a coalition of size ``s`` without the player."""
    return np.array([1.0 / (n * math.comb(n - 1, s)) for s in range(n)])


def exact_shapley(values: np.ndarray, n: int) -> np.ndarray:
    """Shapley values from the value of every coalition (``values[mask]``, ``2**n`` of them)."""
    masks = np.arange(1 << n)
    sizes = np.array([bin(m).count("1") for m in range(1 << n)])
    w = shapley_weights(n)
    out = np.empty(n)
    for i in range(n):
        without = masks[(masks >> i) & 1 == 0]  # coalitions without player i
        out[i] = float(np.sum(w[sizes[without]] * (values[without | (1 << i)] - values[without])))
    return out


@register_estimator(
    "exact",
    f"every coalition's value (2^n of them, at most {MAX_EXACT_PLAYERS} players), in the Shapley formula",
    SHAPLEY_1953,
)
class ExactEstimator(Estimator):
    """All ``2**n`` coalitions in the game's cheapest order, in chunks of ``EXACT_CHUNK``."""

    default_round = EXACT_CHUNK
    sampled = False

    def __init__(self, game: Game, config: ShapleyConfig) -> None:
        super().__init__(game, config)
        if self.n > MAX_EXACT_PLAYERS:
            raise InputError(
                f"exact Shapley values of {self.n} players need 2^{self.n} = {1 << self.n:,} coalitions; the exact "
                f"estimator allows at most {MAX_EXACT_PLAYERS} players; use --estimator permutation, or fewer units "
                "(e.g. --units block)"
            )
        self.sequence = game.order(range(1 << self.n))

    def new_state(self) -> dict[str, Any]:
        return {"next": 0}

    def draw(self, state: dict[str, Any], rng: np.random.Generator, count: int) -> list[Any]:
        return self.sequence[state["next"] : state["next"] + count]

    def coalitions(self, sample: Any) -> list[int]:
        return [int(sample)]

    def update(self, state: dict[str, Any], sample: Any, memo: dict[int, float]) -> None:
        state["next"] += 1

    def finished(self, state: dict[str, Any]) -> bool:
        return state["next"] >= len(self.sequence)

    def estimate(self, state: dict[str, Any], memo: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
        if not self.finished(state):
            return np.full(self.n, np.nan), np.full(self.n, np.nan)
        values = np.array([memo[c] for c in range(1 << self.n)], dtype=np.float64)
        return exact_shapley(values, self.n), np.zeros(self.n)

    def stderr_note(self) -> str:
        return "0: exact for the calibration data (the data's own sampling error is not included)"


@register_estimator(
    "permutation",
    "mean marginal contribution over random permutations in antithetic pairs (a permutation and its reverse); "
    "design cyclic (default): each round is the n cyclic shifts of one random permutation, so every unit takes every "
    "position equally often and the estimate is stratified by position; design independent: independent pairs",
    f"{CASTRO_2009}; antithetic pairs: {ANTITHETIC}; stratification by position: {MALEKI_2013}",
)
class PermutationEstimator(Estimator):
    """Permutation sampling in antithetic pairs, by default in stratified cyclic rounds.

    A pair ``(pi, reversed pi)`` needs the coalitions made of the first ``k`` players of
    ``pi`` and of its last ``k``, ``k = 0..n``: each player gets the mean of its two
    marginal contributions, and a pair's samples sum to ``v(all) - v(none)`` exactly.

    ``design="cyclic"``: a round draws one random permutation ``sigma`` and uses the ``n``
    antithetic pairs of its cyclic shifts. Their coalitions are the cyclic intervals of
    ``sigma``, ``n(n-1) + 2`` of them, so a round costs about as many evaluations as
    ``n/2`` independent pairs. Every player takes every position once forwards and once
    backwards, so the estimate, ``(1/n) * sum over positions s of the mean marginal
    contribution to coalitions of size s``, carries no variance from the (large)
    differences between positions; the first and last positions are exact in every
    round. Each shift is a uniformly random permutation, so each stratum's samples are
    unbiased. Standard errors are stratified: ``sqrt(sum_s var_s / m_s) / n``, from the
    two samples per position and round (conservative: they are negatively correlated).

    ``design="independent"``: independent pairs, with the standard error over pairs.
    """

    default_round = 4
    default_max_samples = 100

    def __init__(self, game: Game, config: ShapleyConfig) -> None:
        super().__init__(game, config)
        self.cyclic = config.design == "cyclic"
        if self.cyclic:
            self.default_round = self.n  # one cyclic round

    def new_state(self) -> dict[str, Any]:
        if self.cyclic:
            # Per player and position: count, sum and sum of squares of marginal contributions.
            return {"pairs": 0, "strata": [[[0.0] * self.n for _ in range(self.n)] for _ in range(3)]}
        return {"pairs": 0, "sum": [0.0] * self.n, "sumsq": [0.0] * self.n}

    def pairs_in(self, sample: Any) -> int:
        return self.n if self.cyclic else 1

    def min_samples_for_tol(self) -> int:
        # Two samples per position and round: one round's standard errors are too noisy.
        return max(self.config.min_samples, 2 * self.n) if self.cyclic else self.config.min_samples

    def draw(self, state: dict[str, Any], rng: np.random.Generator, count: int) -> list[Any]:
        if self.cyclic:
            rounds = count // self.n if state["pairs"] else max(1, count // self.n)
            return [[int(p) for p in rng.permutation(self.n)] for _ in range(rounds)]
        return [[int(p) for p in rng.permutation(self.n)] for _ in range(count)]

    def _interval(self, sigma: list[int], start: int, length: int) -> int:
        """The coalition of ``length`` consecutive players of ``sigma`` from ``start``, cyclically."""
        return sum(1 << sigma[(start + t) % self.n] for t in range(length))

    def _chains(self, perm: list[int]) -> tuple[list[int], list[int]]:
        up, down = [0], [(1 << self.n) - 1]
        for p in perm:
            up.append(up[-1] | 1 << p)
            down.append(down[-1] & ~(1 << p))
        return up, down

    def coalitions(self, sample: Any) -> list[int]:
        if self.cyclic:
            return [self._interval(sample, a, k) for a in range(self.n) for k in range(self.n + 1)]
        up, down = self._chains(sample)
        return up + down

    def update(self, state: dict[str, Any], sample: Any, memo: dict[int, float]) -> None:
        if self.cyclic:
            self._update_cyclic(state, sample, memo)
            return
        up, down = self._chains(sample)
        for k, p in enumerate(sample):
            x = 0.5 * ((memo[up[k + 1]] - memo[up[k]]) + (memo[down[k]] - memo[down[k + 1]]))
            state["sum"][p] += x
            state["sumsq"][p] += x * x
        state["pairs"] += 1

    def _update_cyclic(self, state: dict[str, Any], sigma: list[int], memo: dict[int, float]) -> None:
        count, total, total_sq = state["strata"]
        n = self.n
        for a in range(n):
            for k in range(n):
                # Forwards from shift a: sigma[a+k] joins the k players before it.
                # Backwards: sigma[a-1-k] joins the k players after it.
                for player, before in ((sigma[(a + k) % n], self._interval(sigma, a, k)), (sigma[(a - 1 - k) % n], self._interval(sigma, a - k, k))):
                    x = memo[before | 1 << player] - memo[before]
                    count[player][k] += 1
                    total[player][k] += x
                    total_sq[player][k] += x * x
        state["pairs"] += n

    def estimate(self, state: dict[str, Any], memo: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
        m = state["pairs"]
        if m == 0:
            return np.full(self.n, np.nan), np.full(self.n, np.nan)
        if self.cyclic:
            count, total, total_sq = (np.array(t) for t in state["strata"])
            mean = total / count  # (players, positions)
            var = np.maximum(total_sq - count * mean**2, 0.0) / np.maximum(count - 1, 1)
            err = np.sqrt((var / count).sum(1)) / self.n
            return mean.mean(1), np.where((count >= 2).all(1), err, np.nan)
        s, sq = np.array(state["sum"]), np.array(state["sumsq"])
        mean = s / m
        if m < 2:
            return mean, np.full(self.n, np.nan)
        var = np.maximum(sq - m * mean**2, 0.0) / (m - 1)
        return mean, np.sqrt(var / m)

    def stderr_note(self) -> str:
        if self.cyclic:
            return (
                "stratified Monte Carlo standard error over positions, from cyclic rounds of antithetic permutation "
                "pairs (conservative; the data's own sampling error is not included)"
            )
        return "Monte Carlo standard error over antithetic permutation pairs (the data's own sampling error is not included)"


@register_estimator(
    "local",
    "coalitions of n-k players around the full model (k random units removed), as the paper samples them; "
    "d_i = mean value with unit i present - mean with it absent, reported as (v_full - v_empty)/n + (n-1)/n * d_i, "
    "which has the ranking of d_i and equals the Shapley value for additive games",
    f"{DEEPER_LOOK} (MMLU Shapley from random subnetworks, its code's compute_mmlu_loss_shapley)",
)
class LocalEstimator(Estimator):
    """Local sampling around the full model, as the paper does for MMLU.

    Each sample removes ``k`` players chosen uniformly at random, and ``d_i`` is the mean
    value of the samples with player ``i`` present minus the mean of those with it
    absent (the paper's number). Because every sample has the same size, a player's
    presence means fewer other players: for an additive game ``v(S) = sum of w_j``,
    ``d_i = (n w_i - W) / (n - 1)`` with ``W = v(all) - v(none)``. So the estimator
    reports ``W / n + (n - 1) / n * d_i``: the same ranking as ``d_i``, and the Shapley
    value ``w_i`` of an additive game. With interactions it is not the Shapley value: it
    weighs only coalitions near the full model, and obeys efficiency only in expectation
    for additive games. The raw ``d_i`` is kept as ``details["present_minus_absent"]``.
    """

    default_round = 16
    default_max_samples = 400

    def __init__(self, game: Game, config: ShapleyConfig) -> None:
        super().__init__(game, config)
        self.k = config.local_k or max(1, self.n // 4)
        if not 1 <= self.k < self.n:
            raise InputError(
                f"local_k {self.k} is out of range for {self.n} players; expected 1..{self.n - 1} units removed per sample"
            )

    def new_state(self) -> dict[str, Any]:
        def zeros() -> list[list[float]]:
            return [[0.0] * self.n for _ in range(3)]  # count, sum, sum of squares

        return {"samples": 0, "in": zeros(), "out": zeros()}

    def draw(self, state: dict[str, Any], rng: np.random.Generator, count: int) -> list[Any]:
        return [sorted(int(p) for p in rng.choice(self.n, size=self.k, replace=False)) for _ in range(count)]

    def coalitions(self, sample: Any) -> list[int]:
        full = (1 << self.n) - 1
        return [full & ~sum(1 << p for p in sample)]

    def update(self, state: dict[str, Any], sample: Any, memo: dict[int, float]) -> None:
        v = memo[self.coalitions(sample)[0]]
        removed = set(sample)
        for p in range(self.n):
            n, s, sq = state["out" if p in removed else "in"]
            n[p] += 1
            s[p] += v
            sq[p] += v * v
        state["samples"] += 1

    def present_minus_absent(self, state: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The paper's ``d_i`` and its standard error (Welch: the two means' errors combined)."""

        def mean_var(group: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
            n, s, sq = (np.array(g) for g in group)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = s / n
                var_of_mean = np.maximum(sq - n * mean**2, 0.0) / (n - 1) / n
            return mean, np.where(n >= 2, var_of_mean, np.nan)

        m_in, v_in = mean_var(state["in"])
        m_out, v_out = mean_var(state["out"])
        return m_in - m_out, np.sqrt(v_in + v_out)

    def estimate(self, state: dict[str, Any], memo: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
        d, err = self.present_minus_absent(state)
        full = (1 << self.n) - 1
        if full not in memo or 0 not in memo:
            return np.full(self.n, np.nan), np.full(self.n, np.nan)
        scale = (self.n - 1) / self.n
        return (memo[full] - memo[0]) / self.n + scale * d, scale * err

    def details(self, state: dict[str, Any], memo: dict[int, float]) -> dict[str, np.ndarray]:
        d, err = self.present_minus_absent(state)
        return {"present_minus_absent": d, "present_minus_absent_stderr": err}

    def stderr_note(self) -> str:
        return "(n-1)/n times the standard error of the difference of two means (present, absent) over sampled coalitions"


# --------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class ShapleyResult:
    """Shapley values of the players of one game, with standard errors and costs.

    Attributes:
        players: Player names, in game order.
        values: Value per player (higher = more important).
        stderr: Standard error per player (0 for ``exact``).
        v_full: Value of the coalition of every player.
        v_empty: Value of the empty coalition.
        estimator: The estimator used.
        samples: Samples used (pairs, coalitions, or coalitions enumerated).
        layer_evals: Cost in layer-evaluations (layers x sequences), as an uninterrupted
            run would count it.
        evaluations: Coalitions evaluated.
        stopped: Why sampling stopped: ``complete``, ``tol``, ``budget`` or ``max_samples``.
        config: The settings.
        game: What the values depend on (model, players, value function).
    """

    players: tuple[str, ...]
    values: dict[str, float]
    stderr: dict[str, float]
    v_full: float
    v_empty: float
    estimator: str
    samples: int
    layer_evals: int
    evaluations: int
    stopped: str
    config: ShapleyConfig
    game: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    details: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def efficiency_gap(self) -> float:
        """``sum(values) - (v_full - v_empty)``: 0 up to rounding for exact and permutation."""
        return math.fsum(self.values.values()) - (self.v_full - self.v_empty)

    def ranking(self) -> list[str]:
        """Players from least to most important."""
        return sorted(self.players, key=lambda p: (self.values[p], self.players.index(p)))

    def to_dict(self) -> dict[str, Any]:
        def clean(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "estimator": self.estimator,
            "players": list(self.players),
            "values": {p: clean(v) for p, v in self.values.items()},
            "stderr": {p: clean(v) for p, v in self.stderr.items()},
            "stderr_definition": self.note,
            "v_full": self.v_full,
            "v_empty": self.v_empty,
            "efficiency_gap": clean(self.efficiency_gap),
            "samples": self.samples,
            "layer_evals": self.layer_evals,
            "evaluations": self.evaluations,
            "stopped": self.stopped,
            "config": self.config.to_dict(),
            "game": self.game,
            "details": {k: {p: clean(v) for p, v in d.items()} for k, d in self.details.items()},
        }


@dataclass(frozen=True)
class RoundInfo:
    """Progress after one round, passed to ``on_round`` callbacks.

    Attributes:
        round: Rounds done.
        samples: Samples done.
        layer_evals: Layer-evaluations so far.
        evaluations: Coalitions evaluated so far.
        values: The current estimates, in player order.
        stderr: Their standard errors.
    """

    round: int
    samples: int
    layer_evals: int
    evaluations: int
    values: tuple[float, ...]
    stderr: tuple[float, ...]

    @property
    def max_stderr(self) -> float:
        return max(self.stderr, default=0.0)


def _identity(game: Game, config: ShapleyConfig, round_size: int) -> dict[str, Any]:
    # Stopping rules (tol, budget, max_samples, min_samples) may change between a run and
    # its resumption; everything that changes which values are drawn may not.
    return {
        "estimator": config.estimator,
        "seed": config.seed,
        "round_size": round_size,
        "local_k": config.local_k,
        "design": config.design,
        "game": json.loads(json.dumps(game.identity())),
    }


def _read_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not valid JSON ({exc}); delete it to start over") from None
    if not isinstance(doc, dict) or doc.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{str(path)!r} is not a depthprune Shapley checkpoint; give another --checkpoint path")
    saved = doc.get("identity", {})
    # The game's own keys first, so a message names e.g. "players", not the whole game.
    pairs = [(f"game {k}", saved.get("game", {}).get(k), v) for k, v in identity["game"].items()]
    pairs += [(k, saved.get(k), v) for k, v in identity.items() if k != "game"]
    for key, was, now in pairs:
        if was != now:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was made with another {key} ({was!r}, now {now!r}); "
                "rerun with the same settings, or delete the checkpoint to start over"
            )
    return doc


def _to_state(doc: dict[str, Any]) -> dict[str, Any]:
    state = dict(doc["state"])
    state["memo"] = {int(k): float(v) for k, v in state["memo"].items()}
    return state


def _to_doc(state: dict[str, Any], identity: dict[str, Any], config: ShapleyConfig) -> dict[str, Any]:
    saved = dict(state)
    saved["memo"] = {str(k): v for k, v in state["memo"].items()}
    return {
        "kind": CHECKPOINT_KIND,
        "version": __version__,
        "identity": identity,
        "settings": config.to_dict(),
        "rng": {"generator": "numpy PCG64 seeded by SeedSequence([seed, round])", "next_round": state["round"]},
        "state": saved,
    }


def estimate_shapley(
    game: Game,
    config: ShapleyConfig | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    on_round: Callable[[RoundInfo], None] | None = None,
) -> ShapleyResult:
    """Estimate every player's Shapley value in ``game``.

    Rounds of samples are drawn, their coalitions evaluated together in the game's
    cheapest order, and the running sums updated, until the estimator has nothing left
    (``exact``), every standard error is below ``config.tol`` (after
    ``config.min_samples``), ``config.max_samples`` samples are done, or the next round
    would exceed ``config.budget`` layer-evaluations (it is cut to what fits first).

    Args:
        game: The game (e.g. a :class:`ModelGame`).
        config: Estimator and stopping rules; defaults to ``ShapleyConfig()``.
        checkpoint: A JSON file to save progress to after every round; removed when the
            run finishes.
        resume: Continue from ``checkpoint`` if it exists.
        show_progress: Show a progress bar on a terminal.
        on_round: Called after every round (and its checkpoint) with a :class:`RoundInfo`.

    Returns:
        A :class:`ShapleyResult`.

    Raises:
        InputError: exact enumeration of more than ``MAX_EXACT_PLAYERS`` players, or a
            budget too small for a single evaluation.
        CheckpointError: ``checkpoint`` exists without ``resume``, or was made with other
            settings.
    """
    config = config or ShapleyConfig()
    estimator = get_estimator(config.estimator).cls(game, config)
    round_size = config.round_size or estimator.default_round
    max_samples = (config.max_samples or estimator.default_max_samples) if estimator.sampled else None
    run = _Run(game, estimator, config, _identity(game, config, round_size), None if checkpoint is None else Path(checkpoint))
    run.start(resume)
    total = len(estimator.sequence) if config.estimator == "exact" else (max_samples or 0)  # type: ignore[attr-defined]
    with counter(total, desc=f"shapley ({config.estimator})", disable=not show_progress) as bar:
        bar.update(run.state["samples"])
        while not (stopped := _stop_reason(estimator, run.state, config, max_samples)):
            rng = np.random.default_rng(np.random.SeedSequence([config.seed, run.state["round"]]))
            want = round_size if max_samples is None else min(round_size, max_samples - run.state["samples"])
            stopped, done = run.round(estimator.draw(run.state["est"], rng, want))
            bar.update(done)
            if done and on_round is not None:
                est, err = estimator.estimate(run.state["est"], run.memo)
                state = run.state
                on_round(
                    RoundInfo(
                        state["round"], state["samples"], state["layer_evals"], state["evaluations"],
                        tuple(map(float, est)), tuple(map(float, err)),
                    )
                )
            if stopped:
                break
    return run.result(stopped)


@dataclass
class _Run:
    """The state of one estimation: running sums, memo, costs; saved after every round."""

    game: Game
    estimator: Estimator
    config: ShapleyConfig
    identity: dict[str, Any]
    path: Path | None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def memo(self) -> dict[int, float]:
        return self.state["memo"]

    def start(self, resume: bool) -> None:
        """Load the checkpoint, or start afresh; check an exact run's budget first."""
        game, config, path = self.game, self.config, self.path
        if path is not None and path.exists() and not resume:
            raise CheckpointError(
                f"checkpoint {str(path)!r} from an earlier run exists; pass --resume to continue it, or delete it to start over"
            )
        if path is not None and path.exists():
            self.state = _to_state(_read_checkpoint(path, self.identity))
            logger.info("resuming %s from round %d (%d samples)", path, self.state["round"], self.state["samples"])
        else:
            self.state = {
                "round": 0, "samples": 0, "layer_evals": game.setup_cost(), "evaluations": 0, "memo": {},
                "est": self.estimator.new_state(),
            }
        if config.estimator == "exact" and config.budget is not None:
            need = game.setup_cost() + game.cost(self.estimator.sequence)  # type: ignore[attr-defined]
            if need > config.budget:
                raise InputError(
                    f"exact enumeration of {game.n_players} players needs {need:,} layer-evaluations but the budget is "
                    f"{config.budget:,}; raise --budget, or use --estimator permutation"
                )

    def round(self, samples: list[Any]) -> tuple[str, int]:
        """Evaluate the samples that fit the budget and save; return (why it stops, or "", samples done)."""
        if not samples:
            return "max_samples", 0
        state, config = self.state, self.config
        fit, ordered, cost, first_cost = _fit_budget(self.game, self.estimator, samples, self.memo, state, config)
        if fit == 0:
            if state["samples"] == 0:
                raise InputError(
                    f"budget {config.budget:,} layer-evaluations is too small for one sample of the "
                    f"{config.estimator} estimator, which needs {first_cost:,}; raise --budget"
                    + (" or use the independent design" if config.estimator == "permutation" and config.design == "cyclic" else "")
                )
            return "budget", 0
        self.memo.update(zip(ordered, self.game.evaluate(ordered)))
        for sample in samples[:fit]:
            self.estimator.update(state["est"], sample, self.memo)
        done = sum(self.estimator.pairs_in(x) for x in samples[:fit])
        state["round"] += 1
        state["samples"] += done
        state["layer_evals"] += cost
        state["evaluations"] += len(ordered)
        if self.path is not None:
            write_json_atomic(self.path, _to_doc(state, self.identity, config), force=True)
        return ("budget" if fit < len(samples) else ""), done

    def result(self, stopped: str) -> ShapleyResult:
        """The estimates; removes the checkpoint."""
        game, state, memo = self.game, self.state, self.memo
        values, err = self.estimator.estimate(state["est"], memo)
        if self.path is not None and self.path.exists():
            self.path.unlink()
        logger.info(
            "shapley (%s): %d samples, %d layer-evaluations, stopped: %s",
            self.config.estimator, state["samples"], state["layer_evals"], stopped,
        )
        details = self.estimator.details(state["est"], memo)
        return ShapleyResult(
            players=game.players,
            values={p: float(v) for p, v in zip(game.players, values)},
            stderr={p: float(e) for p, e in zip(game.players, err)},
            v_full=memo[game.full],
            v_empty=memo[0],
            estimator=self.config.estimator,
            samples=state["samples"],
            layer_evals=state["layer_evals"],
            evaluations=state["evaluations"],
            stopped=stopped,
            config=self.config,
            game=self.identity["game"],
            note=self.estimator.stderr_note(),
            details={k: {p: float(x) for p, x in zip(game.players, arr)} for k, arr in details.items()},
        )


def _stop_reason(estimator: Estimator, state: dict[str, Any], config: ShapleyConfig, max_samples: int | None) -> str:
    if estimator.finished(state["est"]):
        return "complete"
    if max_samples is not None and state["samples"] >= max_samples:
        return "max_samples"
    if config.tol is not None and state["samples"] >= estimator.min_samples_for_tol():
        _, err = estimator.estimate(state["est"], state["memo"])
        if bool(np.all(err < config.tol)):
            return "tol"
    return ""


def _fit_budget(
    game: Game,
    estimator: Estimator,
    samples: list[Any],
    memo: dict[int, float],
    state: dict[str, Any],
    config: ShapleyConfig,
) -> tuple[int, list[int], int, int]:
    """The most leading samples whose new coalitions fit the budget.

    The full and empty coalitions are always added. Returns the number of samples that
    fit, their new coalitions in evaluation order, its cost, and the cost of the first
    sample alone (for the message when none fits).
    """

    def plan(count: int) -> tuple[list[int], int]:
        need = {c for x in samples[:count] for c in estimator.coalitions(x)} | {game.full, 0}
        ordered = game.order(c for c in need if c not in memo)
        return ordered, game.cost(ordered)

    fit = len(samples)
    ordered, cost = plan(fit)
    if config.budget is None:
        return fit, ordered, cost, cost
    left = config.budget - state["layer_evals"]
    while fit > 0 and cost > left:
        fit -= 1
        ordered, cost = plan(fit)
    first_cost = cost if fit else plan(1)[1]
    return fit, (ordered if fit else []), (cost if fit else 0), first_cost


# --------------------------------------------------------------------------- models


def unit_games(n_layers: int, kinds: Iterable[str]) -> dict[str, list[Unit]]:
    """Split unit kinds into games of non-overlapping players.

    Blocks play one game; attention and MLP sublayers play another, together. So
    ``block,attn,mlp`` gives a ``block`` game and a ``sublayer`` game.
    """
    kinds = list(dict.fromkeys(kinds))
    for k in kinds:
        check_choice(k, UNIT_KINDS, "unit kind")
    games: dict[str, list[Unit]] = {}
    if "block" in kinds:
        games["block"] = [Unit("block", i) for i in range(n_layers)]
    subs = [k for k in SUBLAYER_KINDS if k in kinds]
    if subs:
        games["sublayer"] = [Unit(k, i) for i in range(n_layers) for k in subs]  # type: ignore[arg-type]
    return games


def shapley_units(
    model: nn.Module | ModelLayout,
    value: ValueFunction,
    units: Sequence[Unit | str],
    config: ShapleyConfig | None = None,
    *,
    absent: Iterable[Unit | str] = (),
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    on_round: Callable[[RoundInfo], None] | None = None,
) -> ShapleyResult:
    """Shapley values of ``units`` of a model under ``value``.

    Args:
        model: A Hugging Face causal LM of a supported family (or its layout), in eval mode.
        value: The value function (see :mod:`depthprune.score.values`).
        units: The players; blocks and sublayers of the same layer must not both play.
        config: Estimator and stopping rules.
        absent: Units masked in every coalition.
        checkpoint: Save progress here after every round (see :func:`estimate_shapley`).
        resume: Continue from ``checkpoint``.
        show_progress: Show a progress bar on a terminal.
        on_round: Progress callback.

    Returns:
        A :class:`ShapleyResult`.
    """
    config = config or ShapleyConfig()
    layout = model if isinstance(model, ModelLayout) else ModelLayout.of(model)
    game = ModelGame(layout, value, units, absent=absent, batch_size=config.batch_size, cache=config.cache)
    return estimate_shapley(game, config, checkpoint=checkpoint, resume=resume, show_progress=show_progress, on_round=on_round)


__all__ = [
    "ESTIMATORS",
    "MAX_EXACT_PLAYERS",
    "Estimator",
    "EstimatorSpec",
    "FunctionGame",
    "Game",
    "ModelGame",
    "RoundInfo",
    "ShapleyConfig",
    "ShapleyResult",
    "estimate_shapley",
    "exact_shapley",
    "get_estimator",
    "register_estimator",
    "shapley_units",
    "unit_games",
]
