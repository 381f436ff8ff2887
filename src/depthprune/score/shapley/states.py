"""The running state of each estimator, as typed dataclasses, and its checkpoint JSON.

The driver saves an estimator's state after every round with ``to_json`` and reads it
back on resume with ``from_json``; the JSON keeps the layout that checkpoints had when
the states were plain dicts, so those still resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from depthprune.errors import CheckpointError


def _floats(x: Any) -> np.ndarray:
    return np.array(x, dtype=np.float64)


@dataclass
class Moments:
    """Count, sum and sum of squares of observations, per cell (any array shape)."""

    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def zeros(cls, *shape: int) -> Moments:
        return cls(np.zeros(shape), np.zeros(shape), np.zeros(shape))

    def add(self, cell: Any, x: float) -> None:
        self.count[cell] += 1
        self.total[cell] += x
        self.total_sq[cell] += x * x

    def mean_and_var_of_mean(self) -> tuple[np.ndarray, np.ndarray]:
        """Per cell: the mean and the variance of the mean (NaN below 2 observations)."""
        n = self.count
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.total / n
            var_of_mean = np.maximum(self.total_sq - n * mean**2, 0.0) / (n - 1) / n
        return mean, np.where(n >= 2, var_of_mean, np.nan)

    def to_json(self) -> list[Any]:
        return [self.count.tolist(), self.total.tolist(), self.total_sq.tolist()]

    @classmethod
    def from_json(cls, doc: list[Any]) -> Moments:
        count, total, total_sq = doc
        return cls(_floats(count), _floats(total), _floats(total_sq))


@dataclass
class ExactState:
    """Exact enumeration: how many coalitions of the fixed sequence are evaluated."""

    next: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"next": self.next}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ExactState:
        return cls(int(doc["next"]))


@dataclass
class PairSums:
    """Independent antithetic pairs: per player, the sum and sum of squares of its
    per-pair marginal contribution (the mean over the pair's two permutations)."""

    pairs: int
    total: np.ndarray  # (n,)
    total_sq: np.ndarray  # (n,)

    def to_json(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "sum": self.total.tolist(), "sumsq": self.total_sq.tolist()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PairSums:
        return cls(int(doc["pairs"]), _floats(doc["sum"]), _floats(doc["sumsq"]))


@dataclass
class StrataSums:
    """Cyclic rounds: moments of marginal contributions per (player, position), and of
    each round's estimate per player (the rounds are the independent replicates)."""

    pairs: int
    strata: Moments  # (players, positions)
    rounds: Moments  # (players,)

    def to_json(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "strata": self.strata.to_json(), "rounds": self.rounds.to_json()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StrataSums:
        if "rounds" not in doc:
            raise CheckpointError(
                "written by an older depthprune, whose cyclic standard errors were computed per position and "
                "came out too small; delete it to start over"
            )
        return cls(int(doc["pairs"]), Moments.from_json(doc["strata"]), Moments.from_json(doc["rounds"]))


@dataclass
class LocalSums:
    """Local sampling: moments of the coalition values with each player present / absent."""

    samples: int
    present: Moments  # (n,)
    absent: Moments  # (n,)

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "in": self.present.to_json(), "out": self.absent.to_json()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LocalSums:
        return cls(int(doc["samples"]), Moments.from_json(doc["in"]), Moments.from_json(doc["out"]))


__all__ = ["ExactState", "LocalSums", "Moments", "PairSums", "StrataSums"]
