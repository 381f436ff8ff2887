"""Iterative (adaptive) pruning: remove one unit at a time, scoring again what is left.

Two methods, both masking the units removed so far while they score the rest:

- ``shapley``: estimate the Shapley value of every remaining unit (any estimator of
  :mod:`depthprune.score.shapley`), remove the least important, repeat.
- ``greedy``: as SLEB does, try removing each remaining unit, and remove the one whose
  removal costs the least value (for the ``loss`` value: the smallest loss increase).

The result is a plan (``plan.json``) that lists the units in removal order, each with its
score at the step it was removed and the model's value after removing it.

Resume: with a checkpoint path, every finished step is saved (and the Shapley estimate
of the current step saves its own rounds next to it, as ``<checkpoint>.step``); a rerun
with ``resume=True`` continues and gives the same plan.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from depthprune import __version__
from depthprune._fs import read_checkpoint, write_json_atomic
from depthprune.errors import CheckpointError, InputError, check_choice
from depthprune.identity import config_sha256
from depthprune.progress import counter
from depthprune.score.registry import DEEPER_LOOK
from depthprune.score.shapley import ModelGame, ShapleyConfig, estimate_shapley
from depthprune.score.shapley.games import require_units
from depthprune.score.values import ValueFunction
from depthprune.units import ModelLayout, Unit

logger = logging.getLogger(__name__)

Method = Literal["shapley", "greedy"]
METHODS: tuple[Method, ...] = ("shapley", "greedy")
CHECKPOINT_KIND = "depthprune-iterative-checkpoint"
SLEB = "Song et al. 2024, SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks (arXiv 2402.09025)"
REFERENCES = {"shapley": DEEPER_LOOK, "greedy": SLEB}


@dataclass(frozen=True)
class IterativeConfig:
    """How to prune step by step.

    Attributes:
        method: ``shapley`` (remove the lowest Shapley value, re-estimate) or ``greedy``
            (remove the unit whose removal costs the least value).
        remove: How many units to remove: a count >= 1, or a fraction 0 < f < 1 of the
            units (rounded to the nearest count, at least 1).
        shapley: Estimator settings for ``shapley``; step ``k`` uses seed ``seed + k``.
        batch_size: Sequences per forward pass.
        cache: Reuse cached prefixes (off only to compare costs).
    """

    method: Method = "shapley"
    remove: int | float = 1
    shapley: ShapleyConfig = field(default_factory=ShapleyConfig)
    batch_size: int = 8
    cache: bool = True

    def __post_init__(self) -> None:
        check_choice(self.method, METHODS, "method")
        r = self.remove
        if isinstance(r, bool) or not isinstance(r, (int, float)) or (isinstance(r, int) and r < 1) or (
            isinstance(r, float) and not 0.0 < r < 1.0
        ):
            raise InputError(f"remove {r!r} is invalid; expected a count (an integer >= 1) or a fraction 0 < f < 1")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")

    def count(self, n_units: int) -> int:
        """The number of units to remove out of ``n_units``."""
        k = self.remove if isinstance(self.remove, int) else max(1, math.floor(self.remove * n_units + 0.5))
        if k >= n_units:
            raise InputError(
                f"cannot remove {k} of {n_units} units: at least one must stay; pass --remove {n_units - 1} or less"
            )
        return k

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shapley"] = self.shapley.to_dict()
        return out


@dataclass(frozen=True)
class PruneStep:
    """One removal.

    Attributes:
        unit: The unit removed.
        score: Its importance at this step: its Shapley value (``shapley``), or the value
            lost by removing it (``greedy``). Higher means more important.
        stderr: The score's standard error (``None`` when exact).
        value_before: The model's value before this step.
        value_after: The model's value with this unit removed too.
        layer_evals: Cost of this step in layer-evaluations.
        scores: Every candidate's score at this step.
        stderrs: Their standard errors (``shapley`` only).
    """

    unit: Unit
    score: float
    stderr: float | None
    value_before: float
    value_after: float
    layer_evals: int
    scores: dict[Unit, float]
    stderrs: dict[Unit, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it would turn the Unit keys into (unhashable) dicts.
        return {
            "unit": str(self.unit),
            "score": self.score,
            "stderr": self.stderr,
            "value_before": self.value_before,
            "value_after": self.value_after,
            "layer_evals": self.layer_evals,
            "scores": {str(u): v for u, v in self.scores.items()},
            "stderrs": {str(u): v for u, v in self.stderrs.items()},
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> PruneStep:
        """The step written by :meth:`to_dict` (unit names are parsed here, once)."""
        return cls(
            unit=Unit.parse(doc["unit"]),
            score=doc["score"],
            stderr=doc["stderr"],
            value_before=doc["value_before"],
            value_after=doc["value_after"],
            layer_evals=doc["layer_evals"],
            scores={Unit.parse(u): v for u, v in doc["scores"].items()},
            stderrs={Unit.parse(u): v for u, v in doc.get("stderrs", {}).items()},
        )


@dataclass(frozen=True)
class IterativeResult:
    """The removal order, the value at each step and the provenance."""

    model: str
    n_layers: int
    units: tuple[Unit, ...]
    steps: tuple[PruneStep, ...]
    config: IterativeConfig
    value: dict[str, Any]
    calibration: dict[str, Any]
    config_sha256: str | None = None

    @property
    def layer_evals(self) -> int:
        return sum(s.layer_evals for s in self.steps)

    @property
    def removed(self) -> list[Unit]:
        return [s.unit for s in self.steps]

    def to_plan(self) -> dict[str, Any]:
        """The ``plan.json`` document (the format of :mod:`depthprune.plan`)."""
        kinds = sorted({u.kind for u in self.units}, key=["block", "attn", "mlp"].index)
        method = self.config.method
        provenance: dict[str, Any] = {
            "metric": f"iterative_shapley_{self.value.get('value')}" if method == "shapley" else f"greedy_{self.value.get('value')}",
            "method": method,
            "reference": REFERENCES[method],
            "units": ",".join(kinds),
            "budget": self.config.remove,
            "keep_first": 0,
            "keep_last": 0,
            "value": self.value,
            "config": self.config.to_dict(),
            "calibration": self.calibration,
            "value_full": self.steps[0].value_before if self.steps else None,
            "layer_evals": self.layer_evals,
            "steps": [s.to_dict() for s in self.steps],
        }
        remove = [
            {"unit": str(s.unit), "replace": "none", "score": s.score, "rank": k, "value": s.value_after, "stderr": s.stderr}
            for k, s in enumerate(self.steps)
        ]
        return {
            "version": __version__,
            "model": self.model,
            "n_layers": self.n_layers,
            "config_sha256": self.config_sha256,
            "remove": remove,
            "provenance": provenance,
        }


def _check_units(units: Sequence[Unit]) -> None:
    kinds = {u.kind for u in units}
    if "block" in kinds and len(kinds) > 1:
        raise InputError("iterative pruning removes blocks or sublayers, not both; pass --units block, or attn, mlp or attn,mlp")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _identity(layout: ModelLayout, value: ValueFunction, units: Sequence[Unit], config: IterativeConfig, k: int) -> dict[str, Any]:
    s = config.shapley
    return json.loads(
        json.dumps(
            {
                "method": config.method,
                "units": [str(u) for u in units],
                "count": k,
                "value": value.describe(),
                "model": getattr(getattr(layout.model, "config", None), "_name_or_path", "") or "",
                "batch_size": config.batch_size,
                "cache": config.cache,
                "shapley": {"estimator": s.estimator, "design": s.design, "seed": s.seed, "round_size": s.round_size,
                            "local_k": s.local_k, "tol": s.tol, "budget": s.budget, "max_samples": s.max_samples},
            }
        )
    )


def iterative_prune(
    model: nn.Module | ModelLayout,
    value: ValueFunction,
    units: Sequence[Unit],
    config: IterativeConfig | None = None,
    *,
    model_name: str = "",
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    on_step: Callable[[PruneStep], None] | None = None,
) -> IterativeResult:
    """Remove ``config.remove`` units one at a time, scoring the remaining ones at every step.

    Args:
        model: A Hugging Face causal LM of a supported family (or its layout), in eval mode.
        value: The value function (higher is better).
        units: Candidate units (:class:`~depthprune.units.Unit`), all blocks or all sublayers.
        config: Method and budget.
        model_name: Recorded in the plan.
        checkpoint: Save every finished step here (a JSON file; removed at the end).
        resume: Continue from ``checkpoint`` if it exists.
        show_progress: Show a progress bar on a terminal.
        on_step: Called after every step (and its checkpoint).

    Returns:
        An :class:`IterativeResult`; :meth:`IterativeResult.to_plan` gives ``plan.json``.

    Raises:
        InputError: mixed blocks and sublayers, or a budget that removes every unit.
        CheckpointError: the checkpoint exists without ``resume``, or belongs to other settings.
    """
    config = config or IterativeConfig()
    layout = model if isinstance(model, ModelLayout) else ModelLayout.of(model)
    parsed = list(units)
    require_units("units", parsed)
    layout.check_units(parsed)
    _check_units(parsed)
    k = config.count(len(parsed))
    identity = _identity(layout, value, parsed, config, k)
    path = Path(checkpoint) if checkpoint is not None else None
    step_path = Path(f"{path}.step") if path is not None else None
    steps: list[PruneStep] = []
    if path is not None and path.exists():
        if not resume:
            raise CheckpointError(
                f"checkpoint {str(path)!r} from an earlier run exists; pass --resume to continue it, or delete it to start over"
            )
        steps = _read_checkpoint(path, identity)
        logger.info("resuming %s after %d steps", path, len(steps))
    elif step_path is not None and step_path.exists() and not resume:
        raise CheckpointError(f"checkpoint {str(step_path)!r} from an earlier run exists; pass --resume, or delete it")
    with counter(k, desc=f"iterative ({config.method})", disable=not show_progress) as bar:
        bar.update(len(steps))
        while len(steps) < k:
            removed = [s.unit for s in steps]
            remaining = [u for u in parsed if u not in removed]
            game = ModelGame(layout, value, remaining, absent=removed, batch_size=config.batch_size, cache=config.cache)
            if config.method == "greedy":
                step = _greedy_step(game)
            else:
                step = _shapley_step(game, config, len(steps), step_path, resume, show_progress)
            steps.append(step)
            logger.info("step %d: remove %s (score %.6g), value %.6g -> %.6g", len(steps), step.unit, step.score, step.value_before, step.value_after)
            if path is not None:
                write_json_atomic(path, {"kind": CHECKPOINT_KIND, "version": __version__, "identity": identity, "steps": [s.to_dict() for s in steps]}, force=True)
            bar.update(1)
            if on_step is not None:
                on_step(step)
    if path is not None and path.exists():
        path.unlink()
    return IterativeResult(
        model=model_name,
        n_layers=layout.n_layers,
        units=tuple(parsed),
        steps=tuple(steps),
        config=config,
        value=value.describe(),
        calibration=value.calibration.to_dict(),
        config_sha256=config_sha256(layout.model.config),
    )


def _read_checkpoint(path: Path, identity: dict[str, Any]) -> list[PruneStep]:
    doc = read_checkpoint(path, CHECKPOINT_KIND, "iterative checkpoint", "give another checkpoint path")
    for key, want in identity.items():
        if doc.get("identity", {}).get(key) != want:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was made with another {key} ({doc.get('identity', {}).get(key)!r}, now {want!r}); "
                "rerun with the same settings, or delete the checkpoint to start over"
            )
    return [PruneStep.from_dict(s) for s in doc["steps"]]


def _greedy_step(game: ModelGame) -> PruneStep:
    """Try removing every remaining unit; remove the one that loses the least value."""
    full = game.full
    candidates = {p: game.without(p) for p in game.players}
    ordered = game.order([full, *candidates.values()])
    cost = game.cost(ordered)
    values = dict(zip(ordered, game.evaluate(ordered)))
    before = values[full]
    lost = {p: before - values[c] for p, c in candidates.items()}
    unit = min(game.players, key=lambda p: (lost[p], game.players.index(p)))
    return PruneStep(
        unit=unit,
        score=lost[unit],
        stderr=None,
        value_before=before,
        value_after=values[candidates[unit]],
        layer_evals=cost,
        scores=lost,
    )


def _shapley_step(
    game: ModelGame, config: IterativeConfig, index: int, step_path: Path | None, resume: bool, show_progress: bool
) -> PruneStep:
    """Estimate the remaining units' Shapley values and remove the least important."""
    shapley = dataclasses.replace(config.shapley, seed=config.shapley.seed + index, batch_size=config.batch_size, cache=config.cache)
    result = estimate_shapley(game, shapley, checkpoint=step_path, resume=resume, show_progress=show_progress)
    unit = result.ranking()[0]
    after = [game.without(unit)]
    extra = game.cost(after)
    value_after = game.evaluate(after)[0]
    return PruneStep(
        unit=unit,
        score=result.values[unit],
        stderr=_finite(result.stderr[unit]) if result.sampled else None,
        value_before=result.v_full,
        value_after=value_after,
        layer_evals=result.layer_evals + extra,
        scores=dict(result.values),
        stderrs={p: _finite(e) for p, e in result.stderr.items()},
    )


def write_plan(result: IterativeResult, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write the plan of ``result`` as JSON, atomically (an existing file needs ``force``)."""
    return write_json_atomic(path, result.to_plan(), force=force)


__all__ = ["METHODS", "IterativeConfig", "IterativeResult", "PruneStep", "iterative_prune", "write_plan"]
