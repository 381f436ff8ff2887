"""Plans: which units to remove, chosen from ``scores.json`` or written by hand.

A plan is reviewable data. ``plan.json`` lists the units to remove (original indices) in
removal order, least important first, with what replaces each one and where the choice
came from::

    {"version": "0.1.0", "model": "...", "n_layers": 32, "config_sha256": "...",
     "remove": [{"unit": "block.25", "replace": "none", "score": 0.0123, "rank": 0}, ...],
     "provenance": {"metric": "cosine", "units": "block", "budget": 4, "keep_first": 0,
                    "keep_last": 1, "scores_sha256": "...", "calibration": {...}}}

A hand-written plan needs only ``{"remove": [{"unit": "block.3"}, ...]}``. ``n_layers`` and
``config_sha256`` (:func:`depthprune.identity.config_sha256` of the scored model's config)
name the model a plan was made for; ``prune`` refuses a plan made for another model.

Scores follow one convention: a higher score means a more important unit, so a plan
removes the lowest-scoring candidates.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from depthprune import __version__
from depthprune._fs import read_json, write_json_atomic
from depthprune.errors import InputError, check_choice
from depthprune.recover.emulators import REPLACE_HELP, REPLACE_RE
from depthprune.scores_file import (
    metric_span,
    parse_unit,
    scores_digest,
    validate_scores,
)
from depthprune.units import UNIT_KINDS, Unit

logger = logging.getLogger(__name__)



def check_replace(value: Any, where: str = "replace") -> str:
    """Return ``value`` if it names a replacement (``none``, ``bias``, ``lowrank:R``, ``linear:R``).

    Raises:
        InputError: ``value`` is anything else.
    """
    if not isinstance(value, str) or not REPLACE_RE.match(value):
        raise InputError(f"unknown {where} {value!r}; expected {REPLACE_HELP}")
    return value


@dataclass(frozen=True)
class PlanConfig:
    """How to choose the units to remove from a scores document.

    Attributes:
        metric: The metric in ``scores.json`` to rank units by (higher = more important).
        units: Which kind of unit to remove: whole blocks, or only attention or MLP paths.
        remove: The budget: a count K >= 1 (an ``int``), or a fraction 0 < f < 1 of the
            candidate units, rounded to the nearest count and at least 1. ``None`` means
            one span for a span metric and is an error otherwise.
        keep_first: Never remove units of the first this many layers.
        keep_last: Never remove units of the last this many layers.
        replace: What stands in for each removed unit: ``none``, ``bias``, ``lowrank:R`` or ``linear:R``.
    """

    metric: str
    units: Literal["block", "attn", "mlp"] = "block"
    remove: int | float | None = None
    keep_first: int = 0
    keep_last: int = 0
    replace: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric.strip():
            raise InputError(f"metric {self.metric!r} is not a metric name; pass --metric NAME as listed in scores.json")
        check_choice(self.units, UNIT_KINDS, "unit kind")
        if self.remove is not None:
            _check_budget(self.remove)
        for name in ("keep_first", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} {value!r} is invalid; expected a whole number >= 0")
        check_replace(self.replace)


def _check_budget(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"remove {value!r} is invalid; expected a count (an integer >= 1) or a fraction 0 < f < 1")
    if isinstance(value, int):
        if value < 1:
            raise InputError(f"remove {value!r} is invalid; expected a count >= 1 or a fraction 0 < f < 1")
    elif not (0.0 < value < 1.0):
        # A float >= 1 is refused rather than read as a count: 1.0 could mean "all of it".
        raise InputError(
            f"remove fraction {value!r} is out of range; expected 0 < f < 1, or a whole number such as 2 for a count"
        )


def parse_budget(text: str) -> int | float:
    """Parse a ``--remove`` budget: ``"3"`` is a count, ``"0.25"`` a fraction.

    Raises:
        InputError: the text is neither a positive integer nor a fraction 0 < f < 1.
    """
    text = text.strip()
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise InputError(
                f"remove {text!r} is not a number; expected a count such as 2 or a fraction such as 0.25"
            ) from None
        if not math.isfinite(value):
            raise InputError(f"remove {text!r} is not a number; expected a count such as 2 or a fraction such as 0.25")
    _check_budget(value)
    return value


def _metric_values(scores: dict[str, Any], metric: str) -> dict[str, float]:
    table = scores["scores"]
    check_choice(metric, table, "metric")
    return table[metric]


# --------------------------------------------------------------------------- making plans


def _budget_count(budget: float, n_candidates: int) -> int:
    if isinstance(budget, int):
        return budget
    # Round half up, not Python's round-half-to-even: 0.5 of 5 units is 3, not 2.
    return max(1, math.floor(budget * n_candidates + 0.5))


def _entry(unit: Unit, replace: str, score: float, rank: int) -> dict[str, Any]:
    return {"unit": str(unit), "replace": replace, "score": score, "rank": rank}


def _check_finite(metric: str, unit: Unit, value: float) -> float:
    if not math.isfinite(value):
        raise InputError(f"score of {metric} for {unit} is {value!r}; expected a finite number (rerun depthprune score)")
    return float(value)


def make_plan(scores: dict[str, Any], config: PlanConfig) -> dict[str, Any]:
    """Choose the least important units under ``config``'s budget.

    Candidates are the metric's units of kind ``config.units`` whose layer index ``i``
    satisfies ``keep_first <= i < n_layers - keep_last``. The K lowest-scoring ones are
    removed (ties go to the lower index), listed least important first. For a span metric
    (its definition has ``"span": n``), the value at ``block.l`` scores blocks
    ``l..l+n-1``; the plan removes the one allowed span with the lowest score.

    Args:
        scores: A scores document (see :func:`depthprune.scores_file.load_scores`).
        config: Metric, unit kind, budget and constraints.

    Returns:
        The plan document (see the module docstring).

    Raises:
        InputError: unknown metric, no scores for the unit kind, a budget larger than the
            candidates or one that removes every block, or a span metric asked for more
            than one span or for sublayers.
    """
    validate_scores(scores)
    n_layers: int = scores["n_layers"]
    values = _metric_values(scores, config.metric)
    span = metric_span(scores, config.metric)
    keep = f"keep_first={config.keep_first}, keep_last={config.keep_last}"
    hi = n_layers - config.keep_last  # first index that must be kept at the end
    parsed = {Unit.parse(name, n_layers): value for name, value in values.items()}
    if span is not None and config.units != "block":
        raise InputError(
            f"metric {config.metric!r} scores spans of {span} blocks; pass --units block, not {config.units!r}"
        )
    kinds_present = sorted({u.kind for u in parsed}, key=UNIT_KINDS.index)
    of_kind = {u: v for u, v in parsed.items() if u.kind == config.units}
    if not of_kind:
        raise InputError(
            f"metric {config.metric!r} has no scores for {config.units} units; it has "
            f"{', '.join(kinds_present) or 'no units'}; pass --units {kinds_present[0] if kinds_present else 'block'}"
        )

    if span is not None:
        remove = _span_plan(of_kind, config, span, n_layers, keep)
    else:
        if config.remove is None:
            raise InputError(f"no budget given for metric {config.metric!r}; pass --remove K (a count) or a fraction such as 0.25")
        candidates = sorted(
            ((_check_finite(config.metric, u, v), u.index, u) for u, v in of_kind.items() if config.keep_first <= u.index < hi)
        )
        if not candidates:
            raise InputError(
                f"no {config.units} units are left to remove: {keep} exclude all of the model's {n_layers} layers"
                if config.keep_first + config.keep_last >= n_layers
                else f"no {config.units} units of metric {config.metric!r} lie between "
                f"layers {config.keep_first} and {hi - 1} ({keep}); lower keep_first/keep_last"
            )
        k = _budget_count(config.remove, len(candidates))
        most = min(len(candidates), n_layers - 1) if config.units == "block" else len(candidates)
        if k > len(candidates):
            raise InputError(
                f"cannot remove {k} {config.units} units: only {len(candidates)} candidates remain with {keep}; "
                f"pass --remove {most} or less"
            )
        if config.units == "block" and k >= n_layers:
            raise InputError(
                f"cannot remove every block: the model has {n_layers} layers and the budget {config.remove!r} "
                f"removes {k}; pass --remove {most} or less"
            )
        remove = [_entry(u, config.replace, score, rank) for rank, (score, _, u) in enumerate(candidates[:k])]

    provenance: dict[str, Any] = {
        "metric": config.metric,
        "units": config.units,
        "budget": config.remove,
        "keep_first": config.keep_first,
        "keep_last": config.keep_last,
        "scores_sha256": scores_digest(scores),
        "calibration": scores.get("calibration"),
    }
    if span is not None:
        provenance["span"] = span
    logger.info("plan: remove %s by %s", ", ".join(e["unit"] for e in remove), config.metric)
    return {
        "version": __version__,
        "model": scores["model"],
        "n_layers": n_layers,
        # The model the scores were made for (depthprune.identity), checked by `prune --plan`.
        "config_sha256": scores.get("config_sha256"),
        "remove": remove,
        "provenance": provenance,
    }


def _span_plan(
    of_kind: dict[Unit, float], config: PlanConfig, span: int, n_layers: int, keep: str
) -> list[dict[str, Any]]:
    """The entries of the lowest-scoring allowed span of a span metric."""
    if config.remove not in (None, 1) or isinstance(config.remove, float):
        raise InputError(
            f"metric {config.metric!r} scores spans of {span} blocks, so the budget is one span; "
            f"got remove {config.remove!r}; pass --remove 1 or leave it out"
        )
    if span >= n_layers:
        raise InputError(f"cannot remove every block: metric {config.metric!r} spans {span} blocks of {n_layers}")
    hi = n_layers - config.keep_last
    starts = sorted(
        (_check_finite(config.metric, u, v), u.index) for u, v in of_kind.items()
        if config.keep_first <= u.index and u.index + span <= hi
    )
    if not starts:
        raise InputError(
            f"no span of {span} blocks fits between layers {config.keep_first} and {hi - 1} ({keep}) "
            f"among the starts scored by metric {config.metric!r}; lower keep_first/keep_last"
        )
    score, start = starts[0]
    return [_entry(Unit("block", start + j), config.replace, score, j) for j in range(span)]


# --------------------------------------------------------------------------- plan files


def write_plan(plan: dict[str, Any], path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``plan`` as JSON to ``path`` atomically.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        InputError: the folder of ``path`` does not exist.
    """
    return write_json_atomic(path, plan, force=force)


def read_plan(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a plan file and check that it is an object with a ``remove`` list.

    Raises:
        InputError: the file is missing, not JSON, or not shaped like a plan.
    """
    doc = read_json(path, "plan file", "run depthprune plan first, or write one by hand")
    where = f"plan file {str(path)!r}"
    if not isinstance(doc, dict) or "remove" not in doc:
        raise InputError(f"{where} has no 'remove' key; expected {{\"remove\": [{{\"unit\": \"block.3\"}}, ...]}}")
    return doc


def plan_units(plan: dict[str, Any], n_layers: int, where: str = "plan") -> list[tuple[Unit, str]]:
    """Validate a plan document's ``remove`` entries against a model of ``n_layers`` layers.

    Each entry needs a ``unit``; ``replace`` defaults to ``"none"``. A bare unit name
    string is accepted as an entry too.

    Returns:
        ``(unit, replace)`` pairs in the plan's order.

    Raises:
        InputError: an entry is malformed, a unit is invalid, out of range, repeated or
            covered by a block that is also removed, a replace value is unknown, or the
            plan was made for a model with another layer count.
    """
    entries = plan.get("remove") if isinstance(plan, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{where}: 'remove' must be a non-empty list such as [{{\"unit\": \"block.3\"}}]")
    planned = plan.get("n_layers")
    if planned is not None and planned != n_layers:
        raise InputError(
            f"{where} was made for a model with {planned} layers but this one has {n_layers}; "
            "make the plan from this model's scores"
        )
    out: list[tuple[Unit, str]] = []
    seen: dict[Unit, int] = {}
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"unit": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("unit"), str):
            raise InputError(f"{where}: remove[{i}] is {entry!r}; expected an object with a \"unit\" such as \"block.3\"")
        unit = parse_unit(entry["unit"], n_layers, where)
        replace = entry.get("replace", "none")
        if not isinstance(replace, str) or not REPLACE_RE.match(replace):
            raise InputError(f"{where}: unknown replace {replace!r} for {unit}; expected {REPLACE_HELP}")
        if unit in seen:
            raise InputError(f"{where}: unit {unit} is listed twice (remove[{seen[unit]}] and remove[{i}]); list it once")
        seen[unit] = i
        out.append((unit, replace))
    blocks = {u.index for u in seen if u.kind == "block"}
    overlap = [str(u) for u in seen if u.kind != "block" and u.index in blocks]
    if overlap:
        raise InputError(
            f"{where}: {', '.join(overlap)} {'is' if len(overlap) == 1 else 'are'} already removed with the whole "
            "block; list either the block or its sublayers"
        )
    return out


def load_plan(path: str | os.PathLike[str], n_layers: int) -> list[tuple[Unit, str]]:
    """Read a plan file and validate it against a model of ``n_layers`` layers.

    Returns:
        ``(unit, replace)`` pairs in the plan's order.

    Raises:
        InputError: see :func:`read_plan` and :func:`plan_units`.
    """
    return plan_units(read_plan(path), n_layers, where=f"plan file {str(path)!r}")


def format_plan(plan: dict[str, Any]) -> str:
    """A short human-readable summary of a plan, one removed unit per line."""
    prov = plan.get("provenance") or {}
    n_layers = plan.get("n_layers")
    entries = [e if isinstance(e, dict) else {"unit": str(e)} for e in plan.get("remove", [])]
    head = f"plan for {plan.get('model', '(model not named)')}"
    if n_layers is not None:
        head += f" ({n_layers} layers)"
    lines = [head + f": remove {len(entries)} unit{'s' if len(entries) != 1 else ''}"]
    if prov:
        by = f"  by metric {prov.get('metric')!r} (lowest score first), units={prov.get('units')}, budget={prov.get('budget')!r}"
        by += f", keep_first={prov.get('keep_first', 0)}, keep_last={prov.get('keep_last', 0)}"
        if prov.get("span"):
            by += f", span={prov['span']}"
        lines.append(by)
    lines.append(f"  {'rank':>4}  {'unit':<10} {'score':>12}  replace")
    for i, e in enumerate(entries):
        score = e.get("score")
        text = f"{score:.6g}" if isinstance(score, (int, float)) else "-"
        lines.append(f"  {e.get('rank', i):>4}  {e.get('unit', '?'):<10} {text:>12}  {e.get('replace', 'none')}")
    blocks = sum(1 for e in entries if str(e.get("unit", "")).startswith("block."))
    if n_layers is not None and blocks:
        lines.append(f"  keeps {n_layers - blocks} of {n_layers} blocks")
    return "\n".join(lines)


__all__ = [
    "PlanConfig",
    "check_replace",
    "format_plan",
    "load_plan",
    "make_plan",
    "parse_budget",
    "plan_units",
    "read_plan",
    "write_plan",
]
