"""The pruning sweep: task score against units removed, one curve per metric.

For each metric, units of one kind are removed cumulatively in that metric's order (least
important first), by masking, and every task is evaluated after each removal. This is the
main figure of Siddiqui et al. (arXiv 2407.16286). Each point is written to
``sweep.json`` as soon as it is measured, so an interrupted sweep resumes where it
stopped.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from depthprune import __version__
from depthprune._fs import write_json_atomic
from depthprune.errors import InputError, check_choice
from depthprune.progress import counter
from depthprune.units import UNIT_KINDS, Unit, mask_units

logger = logging.getLogger(__name__)

# A task evaluator returns {task name: {"score": float, ...protocol and details}}.
Evaluator = Callable[[nn.Module], dict[str, dict[str, Any]]]
SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep.

    Attributes:
        metrics: Metrics of scores.json whose orders are swept.
        units: The kind of unit removed.
        max_remove: Remove 0..max_remove units per metric.
        tasks: Task specs, recorded so that a resumed sweep must use the same ones.
        show_progress: Show a progress bar on a terminal.
    """

    metrics: tuple[str, ...]
    units: str = "block"
    max_remove: int = 1
    tasks: tuple[str, ...] = ()
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.metrics:
            raise InputError("no metrics to sweep; pass --metrics such as cosine,rel_l2")
        check_choice(self.units, UNIT_KINDS, "unit kind")
        if self.max_remove < 1:
            raise InputError(f"--max-remove must be at least 1, got {self.max_remove}")

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("show_progress")
        d["metrics"], d["tasks"] = list(self.metrics), list(self.tasks)
        return d


@dataclass
class SweepResult:
    """All points of a sweep: ``points[metric][k]`` holds the task results after ``k`` removals."""

    model: str
    settings: dict[str, Any]
    orders: dict[str, list[str]]
    points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "orders": self.orders,
            "points": self.points,
            "meta": {"version": __version__, "updated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")},
        }

    def curve(self, metric: str, task: str) -> list[float]:
        """Task score after 0, 1, ... removals in ``metric``'s order."""
        return [p["results"][task]["score"] for p in self.points.get(metric, [])]


def removal_order(scores: dict[str, Any], metric: str, kind: str, n_layers: int) -> list[str]:
    """Units of ``kind``, least important first by ``metric`` (ties by layer index)."""
    table = scores.get("scores", {})
    check_choice(metric, table, "metric", " in the scores file")
    if table[metric] and "span" in scores.get("definitions", {}).get(metric, {}):
        raise InputError(f"{metric!r} scores spans, not single units; sweep a per-unit metric")
    values = {u: v for u, v in table[metric].items() if Unit.parse(u, n_layers).kind == kind}
    if not values:
        kinds = sorted({Unit.parse(u).kind for u in table[metric]})
        raise InputError(f"metric {metric!r} has no {kind} scores; it has {', '.join(kinds)}")
    return sorted(values, key=lambda u: (values[u], Unit.parse(u).index))


def _load_previous(path: Path, settings: dict[str, Any], model: str) -> dict[str, list[dict[str, Any]]]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg}); delete it or pass --force to start over") from exc
    if doc.get("settings") != settings or doc.get("model") != model:
        raise InputError(f"{path} holds a sweep with other settings; pass --force to start over, or another -o")
    return doc.get("points", {})


def sweep(
    model: nn.Module,
    scores: dict[str, Any],
    config: SweepConfig,
    evaluator: Evaluator,
    out_dir: str | os.PathLike[str] | None = None,
    model_name: str = "",
    resume: bool = True,
) -> SweepResult:
    """Evaluate ``model`` with 0..K units masked in each metric's order.

    Args:
        model: The model, unmodified (units are masked, never removed).
        scores: A ``scores.json`` document.
        config: Metrics, unit kind, K and task specs.
        evaluator: Evaluates the (masked) model on every task.
        out_dir: Where ``sweep.json`` is written after every point; ``None`` keeps it in memory.
        model_name: Recorded in the result.
        resume: Reuse the points of an existing ``sweep.json`` with the same settings.

    Returns:
        The :class:`SweepResult`.
    """
    n_layers = int(scores.get("n_layers", 0)) or None
    if n_layers is None:
        raise InputError("scores file has no n_layers; write it with `depthprune score`")
    if config.max_remove >= n_layers and config.units == "block":
        raise InputError(f"--max-remove {config.max_remove} would remove every block of {n_layers}")
    orders = {m: removal_order(scores, m, config.units, n_layers)[: config.max_remove] for m in config.metrics}
    for m, order in orders.items():
        if len(order) < config.max_remove:
            raise InputError(f"metric {m!r} scores only {len(order)} {config.units} units; lower --max-remove")
    settings = config.settings()
    path = None
    if out_dir is not None:
        if not Path(out_dir).absolute().parent.is_dir():
            raise InputError(f"cannot write {str(out_dir)!r}: its parent folder does not exist")
        Path(out_dir).mkdir(exist_ok=True)
        path = Path(out_dir) / SWEEP_FILE
    previous = _load_previous(path, settings, model_name) if (path is not None and resume) else {}
    result = SweepResult(model=model_name, settings=settings, orders=orders)
    baseline: dict[str, Any] | None = None
    total = len(config.metrics) * (config.max_remove + 1)
    with counter(total, desc="sweep", disable=not config.show_progress) as bar:
        for metric in config.metrics:
            points = result.points.setdefault(metric, [])
            done = previous.get(metric, [])
            for k in range(config.max_remove + 1):
                removed = orders[metric][:k]
                if k < len(done) and done[k].get("removed") == removed:
                    points.append(done[k])
                elif k == 0 and baseline is not None:
                    points.append(baseline)
                else:
                    with mask_units(model, removed):
                        results = evaluator(model)
                    points.append({"k": k, "removed": removed, "results": results})
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


def plot_sweep(result: SweepResult, out_dir: str | os.PathLike[str], tasks: Sequence[str] | None = None) -> list[Path]:
    """Write one PNG per task: task score against units removed, one line per metric."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    first = next(iter(result.points.values()), [])
    names = list(tasks) if tasks else (list(first[0]["results"]) if first else [])
    written = []
    for task in names:
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        for metric in result.points:
            ys = result.curve(metric, task)
            ax.plot(range(len(ys)), ys, marker="o", label=metric)
        ax.set_xlabel(f"{result.settings['units']} units removed")
        ax.set_ylabel(task_label(task))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"{task_label(task)} against {result.settings['units']} units removed, per metric order", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / sweep_png_name(task, names)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
        written.append(path)
    return written
