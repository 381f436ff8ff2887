"""The pruning sweep: task score against the fraction of units removed, one curve per
(unit kind, metric).

For each unit kind (``block``, ``attn``, ``mlp``) and each metric, units of that kind are
removed cumulatively in that metric's order (least important first), by masking, and
every task is evaluated after each removal. With one kind this is the main figure of
Siddiqui et al. (arXiv 2407.16286); with several it is their comparison of removing
attention, feed-forward or whole blocks. The unpruned point is evaluated once and shared
by every curve. Each point is written to ``sweep.json`` as soon as it is measured, so an
interrupted sweep resumes where it stopped.

``sweep.json`` format 2::

    {"format": 2, "model", "settings": {"metrics", "units": [kinds], "max_remove", "tasks"},
     "n_units": {kind: units of that kind in the model},
     "orders": {kind: {metric: [units, least important first]}},
     "points": {kind: {metric: [{"k", "fraction", "removed", "results"}, ...]}},
     "meta": {"version"}}

Format 1 (one kind; ``settings.units`` a string, ``orders`` and ``points`` keyed by
metric alone) is read by :func:`load_sweep` and resumed as the same sweep in format 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from depthprune import __version__
from depthprune._fs import atomic_file, make_dir, write_json_atomic
from depthprune.architectures import num_layers
from depthprune.errors import InputError, check_choice
from depthprune.identity import check_made_for
from depthprune.progress import counter
from depthprune.units import UNIT_KINDS, Unit, mask_units

logger = logging.getLogger(__name__)

__all__ = [
    "SWEEP_FILE",
    "SWEEP_FORMAT",
    "SweepConfig",
    "SweepResult",
    "load_sweep",
    "parse_budget",
    "parse_kinds",
    "plot_sweep",
    "removal_counts",
    "removal_order",
    "sweep",
    "sweep_png_name",
    "task_label",
]

# A task evaluator returns {task name: {"score": float, ...protocol and details}}.
Evaluator = Callable[[nn.Module], dict[str, dict[str, Any]]]
SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = 2


def parse_kinds(units: str | Iterable[str]) -> tuple[str, ...]:
    """Unit kinds from ``"block,attn,mlp"`` or a sequence, in the order block, attn, mlp.

    Raises:
        InputError: no kind, or an unknown one (with the closest name).
    """
    items = units.split(",") if isinstance(units, str) else list(units)
    kinds = [str(k).strip() for k in items if str(k).strip()]
    if not kinds:
        raise InputError("no unit kind to sweep; give units such as block or block,attn,mlp")
    for kind in kinds:
        check_choice(kind, UNIT_KINDS, "unit kind", " in the sweep's units")
    return tuple(k for k in UNIT_KINDS if k in kinds)


def parse_budget(value: float | str) -> int | float:
    """A removal budget: a whole number >= 1 is a count of units of each kind; a number
    in (0, 1) is a fraction of each kind's units.

    Raises:
        InputError: anything else (0, a negative number, 1.5, a word).
    """
    bad = InputError(
        f"max_remove must be a count >= 1 (units of each kind) or a fraction in (0, 1) (of each kind's units), got {value!r}"
    )
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad from None
    if float(value).is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return float(value)
    raise bad


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep.

    Attributes:
        metrics: Metrics of scores.json whose orders are swept.
        units: The unit kinds removed, each on its own curves: a tuple, or a string such
            as ``"block,attn,mlp"`` (stored as a tuple in the order block, attn, mlp).
        max_remove: Per kind, remove 0..K units: a count K >= 1, or a fraction in (0, 1)
            of that kind's units (K = floor(fraction x units of the kind)).
        tasks: Task specs, recorded so that a resumed sweep must use the same ones.
        show_progress: Show a progress bar on a terminal.
    """

    metrics: tuple[str, ...]
    units: tuple[str, ...] | str = ("block",)
    max_remove: int | float = 1
    tasks: tuple[str, ...] = ()
    show_progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if not self.metrics:
            raise InputError("no metrics to sweep; pass --metrics such as cosine,rel_l2")
        object.__setattr__(self, "units", parse_kinds(self.units))
        object.__setattr__(self, "max_remove", parse_budget(self.max_remove))
        object.__setattr__(self, "tasks", tuple(self.tasks))

    def n_remove(self, n_units: int) -> int:
        """K, the most units removed of a kind that has ``n_units`` units."""
        if isinstance(self.max_remove, int):
            return self.max_remove
        return math.floor(self.max_remove * n_units + 1e-9)

    def settings(self) -> dict[str, Any]:
        """What a resumed sweep must share (its ``settings`` in sweep.json)."""
        return {"metrics": list(self.metrics), "units": list(self.units), "max_remove": self.max_remove, "tasks": list(self.tasks)}


@dataclass
class SweepResult:
    """All points of a sweep.

    Attributes:
        model: The model's name.
        settings: :meth:`SweepConfig.settings`.
        orders: ``orders[kind][metric]``: the units removed, in order.
        n_units: Units of each kind in the model (empty for a format-1 file).
        points: ``points[kind][metric][k]``: the task results after ``k`` removals.
    """

    model: str
    settings: dict[str, Any]
    orders: dict[str, dict[str, list[str]]]
    n_units: dict[str, int] = field(default_factory=dict)
    points: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SWEEP_FORMAT,
            "model": self.model,
            "settings": self.settings,
            "n_units": self.n_units,
            "orders": self.orders,
            "points": self.points,
            "meta": {"version": __version__},
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SweepResult:
        """A result from a sweep.json document of format 1 or 2."""
        doc = _upgrade(doc)
        return cls(doc.get("model", ""), doc["settings"], doc.get("orders", {}), doc.get("n_units", {}), doc.get("points", {}))

    def lines(self) -> list[tuple[str, str]]:
        """The ``(kind, metric)`` pairs that have points, kinds and metrics in sweep order."""
        return [(kind, metric) for kind, by_metric in self.points.items() for metric in by_metric]

    def curve(self, kind: str, metric: str, task: str) -> list[float]:
        """Task score after 0, 1, ... removals of ``kind`` units in ``metric``'s order."""
        return [p["results"][task]["score"] for p in self.points.get(kind, {}).get(metric, [])]

    def removed_x(self, kind: str, metric: str) -> tuple[list[float], bool]:
        """The x of each point: the fraction of ``kind`` units removed, or the count when
        the number of units is unknown (a format-1 file). Returns ``(xs, is_fraction)``."""
        ks = [p["k"] for p in self.points.get(kind, {}).get(metric, [])]
        n = self.n_units.get(kind)
        return ([k / n for k in ks], True) if n else ([float(k) for k in ks], False)


def _upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """A sweep.json document in format 2 (format 1 had one kind and no ``n_units``)."""
    fmt = doc.get("format", 1)
    if fmt == SWEEP_FORMAT:
        return doc
    if fmt != 1:
        raise InputError(f"sweep.json has format {fmt!r}; this depthprune reads formats 1 and {SWEEP_FORMAT}; upgrade depthprune")
    settings = dict(doc.get("settings", {}))
    kind = settings.get("units", "block")
    settings["units"] = [kind]
    return {
        **doc,
        "format": SWEEP_FORMAT,
        "settings": settings,
        "n_units": {},
        "orders": {kind: doc.get("orders", {})},
        "points": {kind: doc.get("points", {})},
    }


def load_sweep(path: str | os.PathLike[str]) -> SweepResult:
    """Read a ``sweep.json`` (format 1 or 2).

    Raises:
        InputError: a missing file, invalid JSON, or an unknown format.
    """
    p = Path(path)
    if p.is_dir():
        p = p / SWEEP_FILE
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{str(p)!r} does not exist; run depthprune sweep first") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{p} is not valid JSON ({exc.msg})") from exc
    return SweepResult.from_dict(doc)


def removal_order(scores: dict[str, Any], metric: str, kind: str, n_layers: int) -> list[str]:
    """Units of ``kind``, least important first by ``metric`` (ties by layer index)."""
    table = scores.get("scores", {})
    check_choice(metric, table, "metric", " in the scores file")
    if table[metric] and "span" in scores.get("definitions", {}).get(metric, {}):
        raise InputError(f"{metric!r} scores spans, not single units; sweep a per-unit metric")
    values = {u: v for u, v in table[metric].items() if Unit.parse(u, n_layers).kind == kind}
    if not values:
        kinds = sorted({Unit.parse(u).kind for u in table[metric]})
        raise InputError(f"metric {metric!r} has no {kind} scores; it has {', '.join(kinds)}; drop {kind} from the units or the metric")
    return sorted(values, key=lambda u: (values[u], Unit.parse(u).index))


def _load_previous(path: Path, settings: dict[str, Any], model: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    if not path.is_file():
        return {}
    try:
        doc = _upgrade(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg}); delete it or pass --force to start over") from exc
    if doc.get("settings") != settings or doc.get("model") != model:
        raise InputError(f"{path} holds a sweep with other settings; pass --force to start over, or another -o")
    return doc.get("points", {})


def removal_counts(config: SweepConfig, n_layers: int) -> dict[str, int]:
    """K per kind, checked against a model of ``n_layers`` layers (``run`` checks it first).

    Raises:
        InputError: K is 0, more than the kind's units, or every block.
    """
    counts = {}
    for kind in config.units:
        k = config.n_remove(n_layers)
        if k < 1:
            raise InputError(
                f"max_remove {config.max_remove} of {n_layers} {kind} units removes none; give a larger fraction or a count"
            )
        if k > n_layers:
            most = n_layers - 1 if kind == "block" else n_layers
            raise InputError(
                f"max_remove {config.max_remove} is more than the model's {n_layers} {kind} units; give at most {most}"
            )
        if kind == "block" and k >= n_layers:
            raise InputError(f"--max-remove {config.max_remove} would remove every block of {n_layers}")
        counts[kind] = k
    return counts


def sweep(
    model: nn.Module,
    scores: dict[str, Any],
    config: SweepConfig,
    evaluator: Evaluator,
    out_dir: str | os.PathLike[str] | None = None,
    model_name: str = "",
    resume: bool = True,
) -> SweepResult:
    """Evaluate ``model`` with 0..K units of each kind masked in each metric's order.

    Args:
        model: The model, unmodified (units are masked, never removed).
        scores: A ``scores.json`` document.
        config: Metrics, unit kinds, K and task specs.
        evaluator: Evaluates the (masked) model on every task.
        out_dir: Where ``sweep.json`` is written after every point; ``None`` keeps it in memory.
        model_name: Recorded in the result.
        resume: Reuse the points of an existing ``sweep.json`` (format 1 or 2) with the
            same settings; one with other settings is refused.

    Returns:
        The :class:`SweepResult`.
    """
    n_layers = int(scores.get("n_layers", 0)) or None
    if n_layers is None:
        raise InputError("scores file has no n_layers; write it with `depthprune score`")
    check_made_for(scores, model.config, num_layers(model.config), "the scores file", model_name or "this model", "score this model first")
    counts = removal_counts(config, n_layers)
    orders: dict[str, dict[str, list[str]]] = {}
    for kind in config.units:
        orders[kind] = {m: removal_order(scores, m, kind, n_layers)[: counts[kind]] for m in config.metrics}
        for m, order in orders[kind].items():
            if len(order) < counts[kind]:
                raise InputError(f"metric {m!r} scores only {len(order)} {kind} units; lower --max-remove")
    settings = config.settings()
    path = None
    if out_dir is not None:
        make_dir(out_dir)
        path = Path(out_dir) / SWEEP_FILE
    previous = _load_previous(path, settings, model_name) if (path is not None and resume) else {}
    result = SweepResult(model=model_name, settings=settings, orders=orders, n_units={k: n_layers for k in config.units})
    baseline: dict[str, Any] | None = None
    total = sum(len(config.metrics) * (counts[kind] + 1) for kind in config.units)
    with counter(total, desc="sweep", disable=not config.show_progress) as bar:
        for kind in config.units:
            for metric in config.metrics:
                points = result.points.setdefault(kind, {}).setdefault(metric, [])
                done = previous.get(kind, {}).get(metric, [])
                for k in range(counts[kind] + 1):
                    removed = orders[kind][metric][:k]
                    point = {"k": k, "fraction": k / n_layers, "removed": removed}
                    if k < len(done) and done[k].get("removed") == removed:
                        points.append({**point, "results": done[k]["results"]})
                    elif k == 0 and baseline is not None:
                        points.append({**point, "results": baseline["results"]})
                    else:
                        with mask_units(model, removed):
                            results = evaluator(model)
                        points.append({**point, "results": results})
                        if path is not None:
                            write_json_atomic(path, result.to_dict())
                    if k == 0:
                        baseline = points[0]
                    bar.update()
    if path is not None:
        write_json_atomic(path, result.to_dict())
    return result


def task_label(task: str) -> str:
    """A short, readable name for a task spec: its kind and the target's base name."""
    kind, _, rest = task.partition(":")
    target = Path(rest.split(",")[0]).name if rest else ""
    return f"{kind}:{target}" if target else kind


def sweep_png_name(task: str, all_tasks: Sequence[str]) -> str:
    """File name of a task's sweep plot: its kind and target's base name (plus its
    position when another task would get the same name)."""
    kind, _, rest = task.partition(":")
    target = Path(rest.split(",")[0]).name if rest else ""
    name = f"{kind}_{target}" if target else kind
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    same = [t for t in all_tasks if t != task and t.partition(":")[0] == kind and Path(t.partition(":")[2].split(",")[0]).name == target]
    return f"sweep_{slug}_{list(all_tasks).index(task)}.png" if same else f"sweep_{slug}.png"


_KIND_COLORS = {"block": "C0", "attn": "C1", "mlp": "C2"}
_METRIC_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 3)), "P")]


def plot_sweep(result: SweepResult, out_dir: str | os.PathLike[str], tasks: Sequence[str] | None = None) -> list[Path]:
    """Write one PNG per task: task score against the fraction of units removed, one line
    per (kind, metric). With several kinds, the colour is the kind and the line style the
    metric; with one kind, each metric has its own colour."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    out = Path(out_dir)
    lines = result.lines()
    first = result.points[lines[0][0]][lines[0][1]] if lines else []
    names = list(tasks) if tasks else (list(first[0]["results"]) if first else [])
    kinds = list(dict.fromkeys(kind for kind, _ in lines))
    metrics = list(dict.fromkeys(metric for _, metric in lines))
    written = []
    for task in names:
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        fraction = True
        for kind, metric in lines:
            xs, is_fraction = result.removed_x(kind, metric)
            fraction = fraction and is_fraction
            ys = result.curve(kind, metric, task)
            if len(kinds) > 1:
                style, marker = _METRIC_STYLES[metrics.index(metric) % len(_METRIC_STYLES)]
                ax.plot(xs, ys, color=_KIND_COLORS[kind], linestyle=style, marker=marker, markersize=4, label=f"{kind} · {metric}")
            else:
                ax.plot(xs, ys, marker="o", markersize=4, label=metric)
        what = " / ".join(kinds) if kinds else "units"
        if fraction:
            ax.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
            ax.set_xlabel(f"share of {what} units removed ({result.n_units.get(kinds[0], '?')} per kind)")
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel(f"{what} units removed")
        ax.set_ylabel(task_label(task))
        ax.set_title(f"{task_label(task)} against {what} units removed, per metric order", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if len(lines) > 4 else None, ncol=2 if len(lines) > 6 else 1)
        fig.tight_layout()
        path = out / sweep_png_name(task, names)
        with atomic_file(path, force=True) as tmp:
            fig.savefig(tmp, dpi=120)
        written.append(path)
    return written
