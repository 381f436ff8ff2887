"""Shapley estimators: exact enumeration, antithetic permutation sampling, local sampling.

An estimator draws samples, names the coalitions each one needs, and turns their values
into estimates. It is stateless: its running sums live in a typed state object (one
dataclass per estimator, in :mod:`~depthprune.score.shapley.states`) that the driver
keeps, checkpoints as JSON after every round and reads back on resume. Everything that
differs between estimators (round size, sample limits, stopping, what a budget must
cover) is a method here, so the driver has no per-estimator branches.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np

from depthprune.errors import InputError
from depthprune.registry import Registry
from depthprune.score.registry import DEEPER_LOOK
from depthprune.score.shapley.states import (
    ExactState,
    LocalSums,
    Moments,
    PairSums,
    StrataSums,
)

if TYPE_CHECKING:
    from depthprune.score.shapley.config import ShapleyConfig
    from depthprune.score.shapley.games import Game

MAX_EXACT_PLAYERS = 12
EXACT_CHUNK = 256  # coalitions per round of exact enumeration (one checkpoint each)
DESIGNS = ("cyclic", "independent")

SHAPLEY_1953 = "Shapley 1953, A value for n-person games (Contributions to the Theory of Games II)"
CASTRO_2009 = "Castro, Gomez and Tejada 2009, Polynomial calculation of the Shapley value based on sampling (Computers & OR 36(5))"
ANTITHETIC = "Mitchell et al. 2022, Sampling permutations for Shapley value estimation (JMLR 23)"
MALEKI_2013 = "Maleki et al. 2013, Bounding the estimation error of sampling-based Shapley value approximation (arXiv 1306.4265)"

S = TypeVar("S")  # an estimator's running state
X = TypeVar("X")  # one sample

Memo = dict[int, float]  # coalition -> value


# --------------------------------------------------------------------------- the interface


class Estimator(ABC, Generic[S, X]):
    """Draws samples, names the coalitions each needs, and turns their values into estimates.

    Args:
        game: The game (its players and, for ``exact``, its evaluation order and cost).
        config: The settings.
    """

    default_round: ClassVar[int] = 1
    default_max_samples: ClassVar[int | None] = None
    sampled: ClassVar[bool] = True  # False: the result is exact, max_samples and tol do not apply

    def __init__(self, game: Game[Any], config: ShapleyConfig) -> None:
        self.game = game
        self.config = config
        self.n = game.n_players

    # -- sizes and stopping

    @property
    def round_size(self) -> int:
        """Samples drawn per round."""
        return self.config.round_size or self.default_round

    @property
    def max_samples(self) -> int | None:
        """Samples after which the run stops (``None``: no such limit)."""
        return self.config.max_samples or self.default_max_samples

    @property
    def progress_total(self) -> int:
        """Samples a full run takes, for the progress bar."""
        return self.max_samples or 0

    def next_round(self, done: int) -> int:
        """Samples to draw in the next round, after ``done``."""
        return self.round_size if self.max_samples is None else min(self.round_size, self.max_samples - done)

    def min_samples_for_tol(self) -> int:
        """Samples needed before standard errors are trusted to stop a run."""
        return self.config.min_samples

    def stop_reason(self, state: S, memo: Memo, done: int) -> str:
        """Why the run stops before another round (``max_samples``, ``tol``), or ``""``."""
        if self.max_samples is not None and done >= self.max_samples:
            return "max_samples"
        if self.config.tol is not None and done >= self.min_samples_for_tol():
            _, err = self.estimate(state, memo)
            if bool(np.all(err < self.config.tol)):
                return "tol"
        return ""

    def check_budget(self, budget: int) -> None:
        """Raise :class:`InputError` up front if ``budget`` can never give a result."""

    def budget_hint(self) -> str:
        """What else to try, appended to the message when no sample fits the budget."""
        return ""

    def identity(self) -> dict[str, Any]:
        """Settings (besides estimator, seed and round size) that change which samples are drawn."""
        return {}

    # -- samples

    @abstractmethod
    def new_state(self) -> S:
        """The state before any sample."""

    @abstractmethod
    def load_state(self, doc: dict[str, Any]) -> S:
        """The state saved by ``state.to_json()``."""

    @abstractmethod
    def draw(self, state: S, rng: np.random.Generator, count: int) -> list[X]:
        """Up to ``count`` new samples."""

    @abstractmethod
    def coalitions(self, sample: X) -> list[int]:
        """The coalitions whose values ``sample`` needs."""

    @abstractmethod
    def update(self, state: S, sample: X, memo: Memo) -> None:
        """Add one evaluated sample to the running sums."""

    def samples_in(self, sample: X) -> int:
        """How many samples (as counted by ``max_samples``) one drawn sample is."""
        return 1

    # -- results

    @abstractmethod
    def estimate(self, state: S, memo: Memo) -> tuple[np.ndarray, np.ndarray]:
        """Values and standard errors ``(n,)`` from the state."""

    def details(self, state: S, memo: Memo) -> dict[str, np.ndarray]:
        """Further per-player numbers worth keeping with the result."""
        return {}

    def stderr_note(self) -> str:
        return "Monte Carlo standard error of the estimator"


EstimatorBuilder = Callable[["Game[Any]", "ShapleyConfig"], Estimator[Any, Any]]


@dataclass(frozen=True)
class EstimatorSpec:
    """One registered estimator, with the paper it comes from.

    Attributes:
        name: Registry key (``--estimator``).
        description: What it computes.
        reference: Where it comes from.
        build: ``build(game, config)`` makes the estimator.
    """

    name: str
    description: str
    reference: str
    build: EstimatorBuilder


ESTIMATORS: Registry[EstimatorSpec] = Registry("estimator")


def register_estimator(name: str, description: str, reference: str) -> Callable[[EstimatorBuilder], EstimatorBuilder]:
    """Register the decorated builder (an :class:`Estimator` subclass, or a function) under ``name``."""

    def add(build: EstimatorBuilder) -> EstimatorBuilder:
        ESTIMATORS.add(name, EstimatorSpec(name, description, reference, build))
        return build

    return add


def get_estimator(name: str) -> EstimatorSpec:
    """Look an estimator up, suggesting the closest name on a miss."""
    return ESTIMATORS.get(name)


# --------------------------------------------------------------------------- exact


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
class ExactEstimator(Estimator[ExactState, int]):
    """All ``2**n`` coalitions in the game's cheapest order, in chunks of ``EXACT_CHUNK``."""

    default_round = EXACT_CHUNK
    sampled = False

    def __init__(self, game: Game[Any], config: ShapleyConfig) -> None:
        super().__init__(game, config)
        if self.n > MAX_EXACT_PLAYERS:
            raise InputError(
                f"exact Shapley values of {self.n} players need 2^{self.n} = {1 << self.n:,} coalitions; the exact "
                f"estimator allows at most {MAX_EXACT_PLAYERS} players; use --estimator permutation, or fewer units "
                "(e.g. --units block)"
            )
        self.sequence = game.order(range(1 << self.n))

    @property
    def max_samples(self) -> int | None:
        return None

    @property
    def progress_total(self) -> int:
        return len(self.sequence)

    def stop_reason(self, state: ExactState, memo: Memo, done: int) -> str:
        return "complete" if state.next >= len(self.sequence) else ""

    def check_budget(self, budget: int) -> None:
        need = self.game.setup_cost() + self.game.cost(self.sequence)
        if need > budget:
            raise InputError(
                f"exact enumeration of {self.n} players needs {need:,} layer-evaluations but the budget is "
                f"{budget:,}; raise --budget, or use --estimator permutation"
            )

    def new_state(self) -> ExactState:
        return ExactState()

    def load_state(self, doc: dict[str, Any]) -> ExactState:
        return ExactState.from_json(doc)

    def draw(self, state: ExactState, rng: np.random.Generator, count: int) -> list[int]:
        return self.sequence[state.next : state.next + count]

    def coalitions(self, sample: int) -> list[int]:
        return [sample]

    def update(self, state: ExactState, sample: int, memo: Memo) -> None:
        state.next += 1

    def estimate(self, state: ExactState, memo: Memo) -> tuple[np.ndarray, np.ndarray]:
        if state.next < len(self.sequence):
            return np.full(self.n, np.nan), np.full(self.n, np.nan)
        values = np.array([memo[c] for c in range(1 << self.n)], dtype=np.float64)
        return exact_shapley(values, self.n), np.zeros(self.n)

    def stderr_note(self) -> str:
        return "0: exact for the calibration data (the data's own sampling error is not included)"


# --------------------------------------------------------------------------- permutation


class IndependentPairs(Estimator[PairSums, list[int]]):
    """Independent antithetic pairs ``(pi, reversed pi)``.

    A pair needs the coalitions made of the first ``k`` players of ``pi`` and of its last
    ``k``, ``k = 0..n``: each player gets the mean of its two marginal contributions, and a
    pair's samples sum to ``v(all) - v(none)`` exactly. The standard error is over pairs.
    """

    default_round = 4
    default_max_samples = 100

    def identity(self) -> dict[str, Any]:
        return {"design": self.config.design}

    def new_state(self) -> PairSums:
        return PairSums(0, np.zeros(self.n), np.zeros(self.n))

    def load_state(self, doc: dict[str, Any]) -> PairSums:
        return PairSums.from_json(doc)

    def draw(self, state: PairSums, rng: np.random.Generator, count: int) -> list[list[int]]:
        return [[int(p) for p in rng.permutation(self.n)] for _ in range(count)]

    def _chains(self, perm: list[int]) -> tuple[list[int], list[int]]:
        up, down = [0], [(1 << self.n) - 1]
        for p in perm:
            up.append(up[-1] | 1 << p)
            down.append(down[-1] & ~(1 << p))
        return up, down

    def coalitions(self, sample: list[int]) -> list[int]:
        up, down = self._chains(sample)
        return up + down

    def update(self, state: PairSums, sample: list[int], memo: Memo) -> None:
        up, down = self._chains(sample)
        for k, p in enumerate(sample):
            x = 0.5 * ((memo[up[k + 1]] - memo[up[k]]) + (memo[down[k]] - memo[down[k + 1]]))
            state.total[p] += x
            state.total_sq[p] += x * x
        state.pairs += 1

    def estimate(self, state: PairSums, memo: Memo) -> tuple[np.ndarray, np.ndarray]:
        m = state.pairs
        if m == 0:
            return np.full(self.n, np.nan), np.full(self.n, np.nan)
        mean = state.total / m
        if m < 2:
            return mean, np.full(self.n, np.nan)
        var = np.maximum(state.total_sq - m * mean**2, 0.0) / (m - 1)
        return mean, np.sqrt(var / m)

    def stderr_note(self) -> str:
        return "Monte Carlo standard error over antithetic permutation pairs (the data's own sampling error is not included)"


class CyclicPairs(Estimator[StrataSums, list[int]]):
    """Antithetic pairs in stratified cyclic rounds.

    A round draws one random permutation ``sigma`` and uses the ``n`` antithetic pairs of
    its cyclic shifts. Their coalitions are the cyclic intervals of ``sigma``,
    ``n(n-1) + 2`` of them, so a round costs about as many evaluations as ``n/2``
    independent pairs. Every player takes every position once forwards and once
    backwards, so the estimate, ``(1/n) * sum over positions s of the mean marginal
    contribution to coalitions of size s``, carries no variance from the (large)
    differences between positions; the first and last positions are exact in every
    round. Each shift is a uniformly random permutation, so each stratum's samples are
    unbiased.

    Standard errors are over rounds: a round's estimate (its ``2n`` marginal contributions
    per player, averaged by position) is one independent replicate, and the run's
    estimate is the mean of its rounds' estimates. (Treating the positions as
    independent strata, ``sqrt(sum_s var_s / m_s) / n``, underestimates the error: within
    a round a player's predecessors at successive positions are nested sets, so its
    marginal contributions across positions are positively correlated; on the 15-player
    UN Security Council game that error was 1.7 times too small.) A sample is a pair, so
    a round is ``n`` samples.
    """

    default_max_samples = 100

    @property
    def round_size(self) -> int:
        return self.config.round_size or self.n  # one cyclic round

    def min_samples_for_tol(self) -> int:
        # The standard error comes from the spread of whole rounds: wait for 4 of them.
        return max(self.config.min_samples, 4 * self.n)

    def budget_hint(self) -> str:
        return " or use the independent design"

    def identity(self) -> dict[str, Any]:
        return {"design": self.config.design}

    def samples_in(self, sample: list[int]) -> int:
        return self.n

    def new_state(self) -> StrataSums:
        return StrataSums(0, Moments.zeros(self.n, self.n), Moments.zeros(self.n))

    def load_state(self, doc: dict[str, Any]) -> StrataSums:
        return StrataSums.from_json(doc)

    def draw(self, state: StrataSums, rng: np.random.Generator, count: int) -> list[list[int]]:
        rounds = count // self.n if state.pairs else max(1, count // self.n)
        return [[int(p) for p in rng.permutation(self.n)] for _ in range(rounds)]

    def _interval(self, sigma: list[int], start: int, length: int) -> int:
        """The coalition of ``length`` consecutive players of ``sigma`` from ``start``, cyclically."""
        return sum(1 << sigma[(start + t) % self.n] for t in range(length))

    def coalitions(self, sample: list[int]) -> list[int]:
        return [self._interval(sample, a, k) for a in range(self.n) for k in range(self.n + 1)]

    def update(self, state: StrataSums, sample: list[int], memo: Memo) -> None:
        n, sigma = self.n, sample
        this_round = np.zeros(n)
        for a in range(n):
            for k in range(n):
                # Forwards from shift a: sigma[a+k] joins the k players before it.
                # Backwards: sigma[a-1-k] joins the k players after it.
                for player, before in (
                    (sigma[(a + k) % n], self._interval(sigma, a, k)),
                    (sigma[(a - 1 - k) % n], self._interval(sigma, a - k, k)),
                ):
                    x = memo[before | 1 << player] - memo[before]
                    state.strata.add((player, k), x)
                    this_round[player] += x
        for player in range(n):
            state.rounds.add(player, this_round[player] / (2 * n))  # 2 samples at each of n positions
        state.pairs += n

    def estimate(self, state: StrataSums, memo: Memo) -> tuple[np.ndarray, np.ndarray]:
        if state.pairs == 0:
            return np.full(self.n, np.nan), np.full(self.n, np.nan)
        s = state.strata
        mean = (s.total / s.count).mean(1)  # mean over positions of each (player, position) mean
        _, var_of_mean = state.rounds.mean_and_var_of_mean()  # NaN before 2 rounds
        return mean, np.sqrt(var_of_mean)

    def stderr_note(self) -> str:
        return (
            "Monte Carlo standard error over cyclic rounds of antithetic permutation pairs, each round one "
            "independent replicate (the data's own sampling error is not included)"
        )


@register_estimator(
    "permutation",
    "mean marginal contribution over random permutations in antithetic pairs (a permutation and its reverse); "
    "design cyclic (default): each round is the n cyclic shifts of one random permutation, so every unit takes every "
    "position equally often and the estimate is stratified by position; design independent: independent pairs",
    f"{CASTRO_2009}; antithetic pairs: {ANTITHETIC}; stratification by position: {MALEKI_2013}",
)
def permutation_estimator(game: Game[Any], config: ShapleyConfig) -> Estimator[Any, list[int]]:
    """The permutation estimator of ``config.design``: :class:`CyclicPairs` or :class:`IndependentPairs`."""
    designs: dict[str, type[Estimator[Any, list[int]]]] = {"cyclic": CyclicPairs, "independent": IndependentPairs}
    return designs[config.design](game, config)


# --------------------------------------------------------------------------- local


@register_estimator(
    "local",
    "coalitions of n-k players around the full model (k random units removed), as the paper samples them; "
    "d_i = mean value with unit i present - mean with it absent, reported as (v_full - v_empty)/n + (n-1)/n * d_i, "
    "which has the ranking of d_i and equals the Shapley value for additive games",
    f"{DEEPER_LOOK} (MMLU Shapley from random subnetworks, its code's compute_mmlu_loss_shapley)",
)
class LocalEstimator(Estimator[LocalSums, list[int]]):
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

    def __init__(self, game: Game[Any], config: ShapleyConfig) -> None:
        super().__init__(game, config)
        self.k = config.local_k or max(1, self.n // 4)
        if not 1 <= self.k < self.n:
            raise InputError(
                f"local_k {self.k} is out of range for {self.n} players; expected 1..{self.n - 1} units removed per sample"
            )

    def identity(self) -> dict[str, Any]:
        return {"local_k": self.config.local_k}

    def new_state(self) -> LocalSums:
        return LocalSums(0, Moments.zeros(self.n), Moments.zeros(self.n))

    def load_state(self, doc: dict[str, Any]) -> LocalSums:
        return LocalSums.from_json(doc)

    def draw(self, state: LocalSums, rng: np.random.Generator, count: int) -> list[list[int]]:
        return [sorted(int(p) for p in rng.choice(self.n, size=self.k, replace=False)) for _ in range(count)]

    def coalitions(self, sample: list[int]) -> list[int]:
        return [self.game.full & ~sum(1 << p for p in sample)]

    def update(self, state: LocalSums, sample: list[int], memo: Memo) -> None:
        v = memo[self.coalitions(sample)[0]]
        removed = set(sample)
        for p in range(self.n):
            (state.absent if p in removed else state.present).add(p, v)
        state.samples += 1

    def present_minus_absent(self, state: LocalSums) -> tuple[np.ndarray, np.ndarray]:
        """The paper's ``d_i`` and its standard error (Welch: the two means' errors combined)."""
        m_in, v_in = state.present.mean_and_var_of_mean()
        m_out, v_out = state.absent.mean_and_var_of_mean()
        return m_in - m_out, np.sqrt(v_in + v_out)

    def estimate(self, state: LocalSums, memo: Memo) -> tuple[np.ndarray, np.ndarray]:
        d, err = self.present_minus_absent(state)
        full = self.game.full
        if full not in memo or 0 not in memo:
            return np.full(self.n, np.nan), np.full(self.n, np.nan)
        scale = (self.n - 1) / self.n
        return (memo[full] - memo[0]) / self.n + scale * d, scale * err

    def details(self, state: LocalSums, memo: Memo) -> dict[str, np.ndarray]:
        d, err = self.present_minus_absent(state)
        return {"present_minus_absent": d, "present_minus_absent_stderr": err}

    def stderr_note(self) -> str:
        return "(n-1)/n times the standard error of the difference of two means (present, absent) over sampled coalitions"


__all__ = [
    "DESIGNS",
    "ESTIMATORS",
    "MAX_EXACT_PLAYERS",
    "CyclicPairs",
    "Estimator",
    "EstimatorSpec",
    "ExactEstimator",
    "IndependentPairs",
    "LocalEstimator",
    "exact_shapley",
    "get_estimator",
    "register_estimator",
]
