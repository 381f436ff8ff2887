"""The paper's findings, measured on one model by one recipe.

*A deeper look at depth pruning of LLMs* (arXiv 2407.16286) makes four claims that a
user can check on their own model. The ``findings`` stage of ``depthprune run`` measures
each of them from the run's own scores and writes the numbers, figures and the verdicts
they imply:

- **F1**: attention sublayers can be removed far more than MLP sublayers or whole blocks.
  Task scores against the fraction of each unit kind removed, in one metric's order.
- **Static metrics compared**: each static proxy (and leave-one-out) as a block pruning
  order, on the same tasks.
- **F2**: adaptive metrics trade tasks. Blocks ordered by leave-one-out on the
  calibration loss against blocks ordered by leave-one-out on a task (on selection items
  disjoint from the evaluation items); each order evaluated on both.
- **F3**: emulating a removed block's update (bias, low-rank, learned) recovers much of
  what plain removal loses, most for early blocks.

Every evaluation is a masked (or emulated) forward of the unpruned model. Each result is
stored in ``findings/points.json`` as soon as it exists, keyed by what was removed, how
it was stood in for and the task specs, so a killed run resumes without redoing any of
them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict
from torch import nn

from depthprune._fs import (
    copy_file_atomic,
    make_dir,
    os_errors,
    write_json_atomic,
    write_text_atomic,
)
from depthprune.errors import InputError
from depthprune.units import Unit

logger = logging.getLogger(__name__)

POINTS_FILE = "points.json"


@dataclass(frozen=True)
class FindingsSection:
    """Settings of the ``findings`` stage (the recipe's ``findings:`` key).

    Attributes:
        tasks: Task specs measured at every point (e.g. a perplexity slice and a HellaSwag
            slice); defaults to the recipe's ``tasks``.
        kinds: Unit kinds compared in F1.
        metric: The score that orders units in F1.
        max_fraction: F1 removes up to this fraction of each kind's units.
        step: F1 measures every ``step`` units removed.
        static_metrics: Scores compared as block pruning orders.
        static_max_remove: Blocks removed at most in that comparison.
        static_tasks: Tasks of the static comparison; defaults to ``tasks``.
        select_task: F2's task value: a task spec whose score orders blocks by
            leave-one-out. It should use items disjoint from the evaluation tasks'.
        counts: Blocks removed in F2's comparison of the two orders.
        emulate_units: F3's units (an early, a middle and a late block, say).
        emulate_methods: Closed-form stand-ins compared in F3.
        learned: Learned baselines compared in F3.
        learn_steps: Training steps of each learned baseline.
        fit_samples, eval_samples: Calibration sequences for F3's fit and held-out loss.
        doc: Also copy ``findings.md`` and its figures here (e.g. ``docs/findings.md``).
        command: The command that reproduces the run, quoted in the document.
    """

    # A recipe's findings: mapping is validated by pydantic (depthprune.recipe); no unknown keys.
    __pydantic_config__ = ConfigDict(extra="forbid")

    tasks: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=lambda: ["block", "attn", "mlp"])
    metric: str = "loo_loss"
    max_fraction: float = 0.33
    step: int = 2
    static_metrics: list[str] = field(default_factory=lambda: ["cosine", "angular", "rel_l1", "rel_l2", "loo_loss"])
    static_max_remove: int = 6
    static_tasks: list[str] = field(default_factory=list)
    select_task: str | None = None
    counts: list[int] = field(default_factory=lambda: [2, 4, 6])
    emulate_units: list[str] = field(default_factory=list)
    emulate_methods: list[str] = field(default_factory=lambda: ["none", "bias", "lowrank:32"])
    learned: list[str] = field(default_factory=lambda: ["lowrank:32"])
    learn_steps: int = 100
    fit_samples: int = 32
    eval_samples: int = 16
    doc: str | None = None
    command: str = ""

    def __post_init__(self) -> None:
        from depthprune.units import UNIT_KINDS

        for kind in self.kinds:
            if kind not in UNIT_KINDS:
                raise InputError(f"findings.kinds: unknown unit kind {kind!r}; expected some of {', '.join(UNIT_KINDS)}")
        if not 0 < self.max_fraction < 1:
            raise InputError(f"findings.max_fraction must be between 0 and 1, got {self.max_fraction}")
        for name in ("step", "static_max_remove", "learn_steps", "fit_samples", "eval_samples"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"findings.{name} must be at least 1, got {getattr(self, name)}")
        if any(c < 1 for c in self.counts):
            raise InputError(f"findings.counts must be positive block counts, got {self.counts}")
        for u in self.emulate_units:
            Unit.parse(u)


def check_section(s: FindingsSection, recipe_tasks: Sequence[str], metrics: Sequence[str], kinds: Sequence[str]) -> None:
    """Check a findings section against the rest of the recipe, before anything runs.

    Raises:
        InputError: a task spec is malformed, a metric or unit kind is not scored, a
            stand-in or learned method is unknown.
    """
    from depthprune.evaluate import parse_task
    from depthprune.recover.compare import parse_learned
    from depthprune.recover.emulate import parse_stand_in

    tasks = list(s.tasks or recipe_tasks)
    if not tasks:
        raise InputError("findings need tasks: set findings.tasks or the recipe's tasks")
    for spec in [*tasks, *s.static_tasks, *([s.select_task] if s.select_task else [])]:
        parse_task(spec)
    needed = {s.metric, *s.static_metrics} | ({"loo_loss"} if s.select_task else set())
    missing = sorted(needed - set(metrics))
    if missing:
        raise InputError(f"findings use metrics {missing} that score.metrics ({', '.join(metrics)}) does not compute")
    unscored = sorted((set(s.kinds) | {"block"}) - set(kinds))
    if unscored:
        raise InputError(f"findings use unit kinds {unscored} that score.units ({', '.join(kinds)}) does not score")
    for m in s.emulate_methods:
        parse_stand_in(m)
    for m in s.learned:
        parse_learned(m)


class PointCache:
    """Task results of masked or emulated evaluations, saved after each one.

    Args:
        path: The JSON file that holds the points.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.points: dict[str, Any] = {}
        if path.is_file():
            try:
                self.points = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                logger.warning("ignoring unreadable %s; its points are measured again", path)

    @staticmethod
    def key(removed: Sequence[Unit], stand_in: str, tasks: Sequence[str]) -> str:
        return json.dumps({"removed": sorted(str(u) for u in removed), "stand_in": stand_in, "tasks": list(tasks)}, sort_keys=True)

    def get_or_measure(
        self, removed: Sequence[Unit], stand_in: str, tasks: Sequence[str], measure: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        k = self.key(removed, stand_in, tasks)
        if k not in self.points:
            start = time.perf_counter()
            self.points[k] = {"results": measure(), "seconds": round(time.perf_counter() - start, 2)}
            write_json_atomic(self.path, self.points)
        return self.points[k]["results"]


@dataclass
class Findings:
    """Everything the findings stage measured, as written to ``findings.json``."""

    model: str
    n_layers: int
    tasks: list[str]
    f1: dict[str, Any] = field(default_factory=dict)
    static: dict[str, Any] = field(default_factory=dict)
    f2: dict[str, Any] = field(default_factory=dict)
    f3: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the call that wrote this (less after a resume)
    measured_seconds: float = 0.0  # the sum over every point, however many calls measured them

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _scores_by_task(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{spec: {"score", "higher_is_better"}}`` from :func:`depthprune.evaluate.evaluate`'s tasks."""
    from depthprune.evaluate import task_score

    return {spec: {"score": task_score(r), "higher_is_better": r.get("higher_is_better", True)} for spec, r in results.items()}


class _Runner:
    """Evaluates the unpruned model with units masked or emulated, through a PointCache."""

    def __init__(self, model: nn.Module, tokenizer: Any, cache: PointCache) -> None:
        self.model, self.tokenizer, self.cache = model, tokenizer, cache

    def masked(self, removed: Sequence[Unit], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
        from depthprune.evaluate import evaluate
        from depthprune.units import mask_units

        def measure() -> dict[str, Any]:
            with mask_units(self.model, list(removed)):
                return _scores_by_task(evaluate(self.model, self.tokenizer, tasks, show_progress=False)["tasks"])

        return self.cache.get_or_measure(removed, "none", tasks, measure)


def _order(scores: dict[str, Any], metric: str, kind: str, n_layers: int) -> list[Unit]:
    from depthprune.sweep import removal_order

    return [u if isinstance(u, Unit) else Unit.parse(u) for u in removal_order(scores, metric, kind, n_layers)]


def measure_f1(run: _Runner, scores: dict[str, Any], n_layers: int, s: FindingsSection, tasks: list[str]) -> dict[str, Any]:
    """Task scores against the fraction of each unit kind removed, in ``s.metric``'s order."""
    top = int(math.floor(s.max_fraction * n_layers))
    counts = sorted({0, *range(s.step, top + 1, s.step), top})
    out: dict[str, Any] = {"metric": s.metric, "counts": counts, "n_layers": n_layers, "curves": {}}
    for kind in s.kinds:
        order = _order(scores, s.metric, kind, n_layers)
        out["curves"][kind] = [
            {"k": k, "fraction": k / n_layers, "removed": [str(u) for u in order[:k]], "scores": run.masked(order[:k], tasks)}
            for k in counts
        ]
    return out


def measure_static(run: _Runner, scores: dict[str, Any], n_layers: int, s: FindingsSection, tasks: list[str]) -> dict[str, Any]:
    """Each metric's block order, evaluated at 0..``static_max_remove`` blocks removed."""
    out: dict[str, Any] = {"counts": list(range(s.static_max_remove + 1)), "curves": {}}
    for metric in s.static_metrics:
        order = _order(scores, metric, "block", n_layers)
        out["curves"][metric] = [
            {"k": k, "removed": [str(u) for u in order[:k]], "scores": run.masked(order[:k], tasks)}
            for k in out["counts"]
        ]
    return out


def measure_f2(run: _Runner, scores: dict[str, Any], n_layers: int, s: FindingsSection, tasks: list[str]) -> dict[str, Any]:
    """Leave-one-out on the loss against leave-one-out on a task, as block orders."""
    if s.select_task is None:
        return {}
    select = [s.select_task]
    first = run.masked([], select)[s.select_task]
    sign = 1.0 if first["higher_is_better"] else -1.0
    base = first["score"]
    # A block's importance for the task: how much worse the task gets without it.
    task_loo = {}
    for i in range(n_layers):
        task_loo[f"block.{i}"] = sign * (base - run.masked([Unit("block", i)], select)[s.select_task]["score"])
    by_loss = _order(scores, "loo_loss", "block", n_layers)
    by_task = sorted((Unit("block", i) for i in range(n_layers)), key=lambda u: (task_loo[str(u)], u.index))
    rows = []
    for k in [0, *s.counts]:
        rows.append(
            {
                "k": k,
                "by_loss": {"removed": [str(u) for u in by_loss[:k]], "scores": run.masked(by_loss[:k], tasks)},
                "by_task": {"removed": [str(u) for u in by_task[:k]], "scores": run.masked(by_task[:k], tasks)},
            }
        )
    return {"select_task": s.select_task, "select_baseline": base, "task_loo": task_loo, "rows": rows}


def measure_f3(
    model: nn.Module, tokenizer: Any, data: Any, s: FindingsSection, tasks: list[str], cache: PointCache, show_progress: bool
) -> dict[str, Any]:
    """Held-out loss and task scores of each early/middle/late unit under each stand-in."""
    if not s.emulate_units:
        return {}
    from depthprune.evaluate import evaluate
    from depthprune.recover.compare import (
        CompareConfig,
        compare_recovery,
        split_heldout,
    )

    fit, held_out = split_heldout(data, min(s.eval_samples, len(data.input_ids) - 1))
    out: dict[str, Any] = {"fit": fit.info.to_dict(), "eval": held_out.info.to_dict(), "units": {}}

    def evaluator(m: nn.Module) -> dict[str, dict[str, Any]]:
        return _scores_by_task(evaluate(m, tokenizer, tasks, show_progress=False)["tasks"])

    for name in s.emulate_units:
        unit = Unit.parse(name)
        stand_ins = "f3:" + ",".join([*s.emulate_methods, *(f"learned-{x}" for x in s.learned)])

        def measure(unit: Unit = unit) -> dict[str, Any]:
            config = CompareConfig(
                methods=tuple(s.emulate_methods), learned=tuple(s.learned), counts=(1,), steps=s.learn_steps,
                show_progress=show_progress,
            )
            result = compare_recovery(model, [unit], fit, held_out, config, evaluator=evaluator)
            return {"baseline_loss": result.baseline_loss, "rows": [r for r in result.rows if r["removed"] == 1]}

        out["units"][name] = cache.get_or_measure([unit], stand_ins, tasks, measure)
    return out


def run_findings(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    scores: dict[str, Any],
    section: FindingsSection,
    out_dir: Path,
    model_name: str,
    default_tasks: Sequence[str],
    show_progress: bool = True,
) -> Findings:
    """Measure every finding into ``out_dir`` (``points.json``, ``findings.json``, figures, ``findings.md``).

    Args:
        model: The unpruned model; units are masked or emulated, never removed.
        tokenizer: Its tokenizer.
        data: Calibration batches (F3 fits on part of them and measures loss on the rest).
        scores: The run's ``scores.json`` document.
        section: What to measure.
        out_dir: Where to write.
        model_name: Recorded in the outputs.
        default_tasks: Tasks to use when the section names none.
        show_progress: Progress bars on a terminal.

    Returns:
        The :class:`Findings`.
    """
    tasks = list(section.tasks or default_tasks)
    if not tasks:
        raise InputError("findings need tasks: set findings.tasks or the recipe's tasks")
    static_tasks = list(section.static_tasks or tasks)
    from depthprune.architectures import num_layers
    from depthprune.identity import check_made_for

    check_made_for(scores, model.config, num_layers(model.config), "the scores file", model_name, "score this model first")
    make_dir(out_dir)
    n_layers = int(scores["n_layers"])
    cache = PointCache(out_dir / POINTS_FILE)
    run = _Runner(model, tokenizer, cache)
    start = time.perf_counter()
    found = Findings(model=model_name, n_layers=n_layers, tasks=tasks)
    logger.info("findings: F1 (unit kinds)")
    found.f1 = measure_f1(run, scores, n_layers, section, tasks)
    logger.info("findings: static metrics as pruning orders")
    found.static = measure_static(run, scores, n_layers, section, static_tasks)
    logger.info("findings: F2 (loss against task orders)")
    found.f2 = measure_f2(run, scores, n_layers, section, tasks)
    logger.info("findings: F3 (emulation)")
    found.f3 = measure_f3(model, tokenizer, data, section, tasks, cache, show_progress)
    found.seconds = round(time.perf_counter() - start, 1)
    found.measured_seconds = round(sum(float(p.get("seconds", 0)) for p in cache.points.values()), 1)
    write_json_atomic(out_dir / "findings.json", found.to_dict())
    from depthprune.findings_doc import write_findings_doc

    doc = write_findings_doc(found, scores, section, out_dir)
    if section.doc:
        _copy_doc(doc, out_dir, Path(section.doc))
    return found


def _copy_doc(doc: Path, out_dir: Path, target: Path) -> None:
    """Copy ``findings.md`` and its figures next to ``target`` (figures in ``<stem>/``)."""
    with os_errors(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
    figures = make_dir(target.parent / target.stem)
    text = doc.read_text(encoding="utf-8")
    for png in sorted(out_dir.glob("*.png")):
        copy_file_atomic(png, figures / png.name)
        text = text.replace(f"]({png.name})", f"]({target.stem}/{png.name})")
    write_text_atomic(target, text)
