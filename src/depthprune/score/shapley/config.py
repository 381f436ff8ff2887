"""The settings of one Shapley estimation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from depthprune.errors import InputError, check_choice
from depthprune.score.shapley.estimators import DESIGNS, get_estimator


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


__all__ = ["ShapleyConfig"]
