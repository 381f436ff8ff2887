"""The run loop: rounds of samples, budgets, checkpoints and resume, and the model entry points.

Rounds of samples are drawn, their new coalitions evaluated together in the game's
cheapest order, and the estimator's running sums updated. Every evaluated coalition's
value is kept (a memo), so none is evaluated twice.

Resume. A run with a checkpoint path writes, after every round, the seed, the settings,
the round counter (round ``r`` draws from a generator seeded by ``(seed, r)``), the
estimator's state and the memo. Rerun with ``resume=True`` it continues from the last
round and gives the same values, samples and cost as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from torch import nn

from depthprune import __version__
from depthprune._fs import read_checkpoint, write_json_atomic
from depthprune.errors import CheckpointError, InputError, check_choice
from depthprune.progress import counter
from depthprune.score.shapley.config import ShapleyConfig
from depthprune.score.shapley.estimators import Estimator, get_estimator
from depthprune.score.shapley.games import Game, ModelGame
from depthprune.score.values import ValueFunction
from depthprune.units import SUBLAYER_KINDS, UNIT_KINDS, ModelLayout, Unit

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "depthprune-shapley-checkpoint"

P = TypeVar("P", bound=Hashable)


@dataclass(frozen=True)
class ShapleyResult(Generic[P]):
    """Shapley values of the players of one game, with standard errors and costs.

    Attributes:
        players: The players, in game order (units for a model game).
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
        note: What the standard errors mean.
        details: Further per-player numbers of the estimator.
        sampled: False when the values are exact (no sampling error).
    """

    players: tuple[P, ...]
    values: dict[P, float]
    stderr: dict[P, float]
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
    details: dict[str, dict[P, float]] = field(default_factory=dict)
    sampled: bool = True

    @property
    def efficiency_gap(self) -> float:
        """``sum(values) - (v_full - v_empty)``: 0 up to rounding for exact and permutation."""
        return math.fsum(self.values.values()) - (self.v_full - self.v_empty)

    def ranking(self) -> list[P]:
        """Players from least to most important."""
        return sorted(self.players, key=lambda p: (self.values[p], self.players.index(p)))

    def to_dict(self) -> dict[str, Any]:
        def clean(x: float) -> float | None:
            return x if math.isfinite(x) else None

        def table(d: dict[P, float]) -> dict[str, float | None]:
            return {str(p): clean(v) for p, v in d.items()}

        return {
            "estimator": self.estimator,
            "players": [str(p) for p in self.players],
            "values": table(self.values),
            "stderr": table(self.stderr),
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
            "details": {k: table(d) for k, d in self.details.items()},
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


# --------------------------------------------------------------------------- run state and checkpoints


@dataclass
class RunState:
    """Everything a run has done, saved after every round.

    Attributes:
        round: Rounds done (round ``r`` draws from a generator seeded by ``(seed, r)``).
        samples: Samples done.
        layer_evals: Layer-evaluations spent, the setup pass included.
        evaluations: Coalitions evaluated.
        memo: The value of every evaluated coalition.
        est: The estimator's running sums (its own typed state).
    """

    round: int
    samples: int
    layer_evals: int
    evaluations: int
    memo: dict[int, float]
    est: Any

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "samples": self.samples,
            "layer_evals": self.layer_evals,
            "evaluations": self.evaluations,
            "memo": {str(k): v for k, v in self.memo.items()},  # JSON keys are strings
            "est": self.est.to_json(),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], estimator: Estimator[Any, Any]) -> RunState:
        return cls(
            round=int(doc["round"]),
            samples=int(doc["samples"]),
            layer_evals=int(doc["layer_evals"]),
            evaluations=int(doc["evaluations"]),
            memo={int(k): float(v) for k, v in doc["memo"].items()},
            est=estimator.load_state(doc["est"]),
        )


def _identity(game: Game[Any], estimator: Estimator[Any, Any]) -> dict[str, Any]:
    # Stopping rules (tol, budget, max_samples, min_samples) may change between a run and
    # its resumption; everything that changes which values are drawn may not.
    config = estimator.config
    return {
        "estimator": config.estimator,
        "seed": config.seed,
        "round_size": estimator.round_size,
        **estimator.identity(),
        "game": json.loads(json.dumps(game.identity())),
    }


def _read_checkpoint(path: Path, identity: dict[str, Any], estimator: Estimator[Any, Any]) -> RunState:
    doc = read_checkpoint(path, CHECKPOINT_KIND, "Shapley checkpoint", "give another --checkpoint path")
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
    try:
        return RunState.from_json(doc["state"], estimator)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete ({exc!r}); delete it to start over") from None


def _write_checkpoint(path: Path, state: RunState, identity: dict[str, Any], config: ShapleyConfig) -> None:
    doc = {
        "kind": CHECKPOINT_KIND,
        "version": __version__,
        "identity": identity,
        "settings": config.to_dict(),
        "rng": {"generator": "numpy PCG64 seeded by SeedSequence([seed, round])", "next_round": state.round},
        "state": state.to_json(),
    }
    write_json_atomic(path, doc, force=True)


# --------------------------------------------------------------------------- the loop


def estimate_shapley(
    game: Game[P],
    config: ShapleyConfig | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    on_round: Callable[[RoundInfo], None] | None = None,
) -> ShapleyResult[P]:
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
    estimator = get_estimator(config.estimator).build(game, config)
    run = _Run(game, estimator, _identity(game, estimator), None if checkpoint is None else Path(checkpoint))
    run.start(resume)
    with counter(estimator.progress_total, desc=f"shapley ({config.estimator})", disable=not show_progress) as bar:
        bar.update(run.state.samples)
        while not (stopped := estimator.stop_reason(run.state.est, run.state.memo, run.state.samples)):
            rng = np.random.default_rng(np.random.SeedSequence([config.seed, run.state.round]))
            stopped, done = run.round(estimator.draw(run.state.est, rng, estimator.next_round(run.state.samples)))
            bar.update(done)
            if done and on_round is not None:
                on_round(run.info())
            if stopped:
                break
    return run.result(stopped)


@dataclass
class _Run(Generic[P]):
    """One estimation: the game, the estimator and the :class:`RunState`, saved after every round."""

    game: Game[P]
    estimator: Estimator[Any, Any]
    identity: dict[str, Any]
    path: Path | None
    state: RunState = field(init=False)

    @property
    def config(self) -> ShapleyConfig:
        return self.estimator.config

    def start(self, resume: bool) -> None:
        """Load the checkpoint, or start afresh; check that the budget can give a result."""
        path = self.path
        if path is not None and path.exists() and not resume:
            raise CheckpointError(
                f"checkpoint {str(path)!r} from an earlier run exists; pass --resume to continue it, or delete it to start over"
            )
        if path is not None and path.exists():
            self.state = _read_checkpoint(path, self.identity, self.estimator)
            logger.info("resuming %s from round %d (%d samples)", path, self.state.round, self.state.samples)
        else:
            self.state = RunState(0, 0, self.game.setup_cost(), 0, {}, self.estimator.new_state())
        if self.config.budget is not None:
            self.estimator.check_budget(self.config.budget)

    def round(self, samples: list[Any]) -> tuple[str, int]:
        """Evaluate the samples that fit the budget and save; return (why it stops, or "", samples done)."""
        if not samples:
            return "max_samples", 0
        state, config, estimator = self.state, self.config, self.estimator
        fit, ordered, cost, first_cost = _fit_budget(self.game, estimator, samples, state, config.budget)
        if fit == 0:
            if state.samples == 0:
                raise InputError(
                    f"budget {config.budget:,} layer-evaluations is too small for one sample of the "
                    f"{config.estimator} estimator, which needs {first_cost:,}; raise --budget" + estimator.budget_hint()
                )
            return "budget", 0
        state.memo.update(zip(ordered, self.game.evaluate(ordered)))
        for sample in samples[:fit]:
            estimator.update(state.est, sample, state.memo)
        done = sum(estimator.samples_in(x) for x in samples[:fit])
        state.round += 1
        state.samples += done
        state.layer_evals += cost
        state.evaluations += len(ordered)
        if self.path is not None:
            _write_checkpoint(self.path, state, self.identity, config)
        return ("budget" if fit < len(samples) else ""), done

    def info(self) -> RoundInfo:
        est, err = self.estimator.estimate(self.state.est, self.state.memo)
        s = self.state
        return RoundInfo(s.round, s.samples, s.layer_evals, s.evaluations, tuple(map(float, est)), tuple(map(float, err)))

    def result(self, stopped: str) -> ShapleyResult[P]:
        """The estimates; removes the checkpoint."""
        game, state, estimator = self.game, self.state, self.estimator
        values, err = estimator.estimate(state.est, state.memo)
        if self.path is not None and self.path.exists():
            self.path.unlink()
        logger.info(
            "shapley (%s): %d samples, %d layer-evaluations, stopped: %s",
            self.config.estimator, state.samples, state.layer_evals, stopped,
        )
        details = estimator.details(state.est, state.memo)
        return ShapleyResult(
            players=game.players,
            values={p: float(v) for p, v in zip(game.players, values)},
            stderr={p: float(e) for p, e in zip(game.players, err)},
            v_full=state.memo[game.full],
            v_empty=state.memo[0],
            estimator=self.config.estimator,
            samples=state.samples,
            layer_evals=state.layer_evals,
            evaluations=state.evaluations,
            stopped=stopped,
            config=self.config,
            game=self.identity["game"],
            note=estimator.stderr_note(),
            details={k: {p: float(x) for p, x in zip(game.players, arr)} for k, arr in details.items()},
            sampled=estimator.sampled,
        )


def _fit_budget(
    game: Game[Any], estimator: Estimator[Any, Any], samples: list[Any], state: RunState, budget: int | None
) -> tuple[int, list[int], int, int]:
    """The most leading samples whose new coalitions fit the budget.

    The full and empty coalitions are always added. Returns the number of samples that
    fit, their new coalitions in evaluation order, its cost, and the cost of the first
    sample alone (for the message when none fits).
    """

    def plan(count: int) -> tuple[list[int], int]:
        need = {c for x in samples[:count] for c in estimator.coalitions(x)} | {game.full, 0}
        ordered = game.order(c for c in need if c not in state.memo)
        return ordered, game.cost(ordered)

    fit = len(samples)
    ordered, cost = plan(fit)
    if budget is None:
        return fit, ordered, cost, cost
    left = budget - state.layer_evals
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
    units: Sequence[Unit],
    config: ShapleyConfig | None = None,
    *,
    absent: Iterable[Unit] = (),
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    on_round: Callable[[RoundInfo], None] | None = None,
) -> ShapleyResult[Unit]:
    """Shapley values of ``units`` of a model under ``value``.

    Args:
        model: A Hugging Face causal LM of a supported family (or its layout), in eval mode.
        value: The value function (see :mod:`depthprune.score.values`).
        units: The players (:class:`~depthprune.units.Unit`; parse names with
            :func:`~depthprune.units.parse_units`); blocks and sublayers of the same layer
            must not both play.
        config: Estimator and stopping rules.
        absent: Units masked in every coalition.
        checkpoint: Save progress here after every round (see :func:`estimate_shapley`).
        resume: Continue from ``checkpoint``.
        show_progress: Show a progress bar on a terminal.
        on_round: Progress callback.

    Returns:
        A :class:`ShapleyResult` keyed by unit.
    """
    config = config or ShapleyConfig()
    layout = model if isinstance(model, ModelLayout) else ModelLayout.of(model)
    game = ModelGame(layout, value, units, absent=absent, batch_size=config.batch_size, cache=config.cache)
    return estimate_shapley(game, config, checkpoint=checkpoint, resume=resume, show_progress=show_progress, on_round=on_round)


__all__ = ["RoundInfo", "RunState", "ShapleyResult", "estimate_shapley", "shapley_units", "unit_games"]
