"""Recipes: the whole job (score, plan, prune, recover, evaluate, sweep, report) from one file.

A recipe is a YAML (or JSON) mapping validated against the dataclasses below; an unknown
key is refused with a did-you-mean. ``run_recipe`` runs the stages in order into one
output folder. A stage whose outputs are present and were made from the same settings
(recorded in ``stages.json``) is skipped, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from depthprune.errors import InputError, check_choice
from depthprune.findings import FindingsSection


@dataclass(frozen=True)
class DataSection:
    """Calibration data: ``source`` as for ``depthprune score --data``."""

    source: str
    samples: int = 32
    seq_len: int = 256
    seed: int = 0
    text_field: str = "text"


@dataclass(frozen=True)
class ScoreSection:
    metrics: list[str] = field(default_factory=lambda: ["cosine", "angular", "rel_l1", "rel_l2", "loo_loss"])
    units: list[str] = field(default_factory=lambda: ["block", "attn", "mlp"])
    batch_size: int = 8


@dataclass(frozen=True)
class PlanSection:
    metric: str = "loo_loss"
    units: str = "block"
    remove: float = 1
    keep_first: int = 0
    keep_last: int = 0


@dataclass(frozen=True)
class SweepSection:
    """``units``: one kind, ``"block,attn,mlp"`` or a list; ``max_remove``: a count per kind
    or a fraction in (0, 1) of each kind's units (see :class:`depthprune.sweep.SweepConfig`)."""

    metrics: list[str] = field(default_factory=lambda: ["cosine", "rel_l2", "loo_loss"])
    units: str | list[str] = "block"
    max_remove: int | float = 2


@dataclass(frozen=True)
class Recipe:
    """One pruning job.

    Attributes:
        model: A local model folder or a Hub id.
        data: Calibration data.
        tasks: Evaluation task specs (see ``depthprune eval``), run before and after.
        recover: ``none``, ``bias`` or ``lowrank:R`` for the removed units.
        score, plan, sweep: Stage settings; ``sweep: null`` skips the sweep.
        findings: The paper's findings measured on this model (see
            :mod:`depthprune.findings`); ``null`` (the default) skips them.
        dtype, device, trust_remote_code: Model loading.
        report: Write ``report.html``.
    """

    model: str
    data: DataSection
    tasks: list[str] = field(default_factory=list)
    recover: str = "none"
    score: ScoreSection = field(default_factory=ScoreSection)
    plan: PlanSection = field(default_factory=PlanSection)
    sweep: SweepSection | None = field(default_factory=SweepSection)
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    report: bool = True
    findings: FindingsSection | None = None

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings a stage's output depends on (its resume key)."""
        base = {"model": self.model, "dtype": self.dtype, "data": dataclasses.asdict(self.data)}
        if stage == "score":
            return {**base, "score": dataclasses.asdict(self.score)}
        if stage == "plan":
            return {**self.stage_settings("score"), "plan": dataclasses.asdict(self.plan)}
        if stage == "prune":
            return {**self.stage_settings("plan"), "recover": self.recover}
        if stage == "evaluate":
            return {**self.stage_settings("prune"), "tasks": self.tasks}
        if stage == "report":
            return dataclasses.asdict(self)
        if stage == "findings":
            return {**self.stage_settings("score"), "tasks": self.tasks, "findings": dataclasses.asdict(self.findings) if self.findings else None}
        if stage == "sweep":
            return {**self.stage_settings("score"), "tasks": self.tasks, "sweep": dataclasses.asdict(self.sweep) if self.sweep else None}
        raise ValueError(stage)


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, refusing unknown keys with a suggestion."""
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        check_choice(key, names, "key", f" in {where}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InputError(f"{where} is missing the required key {f.name!r}")
            continue
        value, hint = data[f.name], hints[f.name]
        nested = next((t for t in (DataSection, ScoreSection, PlanSection, SweepSection, FindingsSection) if t in getattr(hint, "__args__", (hint,))), None)
        if nested is not None and value is not None:
            value = _build(nested, value, f"{where}.{f.name}" if where != "recipe" else f.name)
        kwargs[f.name] = value
    return cls(**kwargs)


def read_recipe_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe file (YAML or JSON) as a mapping, without validating its keys.

    Raises:
        InputError: the file is missing, is not valid YAML, or is not a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"recipe {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"recipe {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise InputError(f"recipe {str(p)!r} must be a mapping of settings, got {type(data).__name__}")
    return data


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe file.

    Raises:
        InputError: the file is unreadable, or has unknown or missing keys.
    """
    return recipe_from_dict(read_recipe_file(path))


def recipe_from_dict(data: Any) -> Recipe:
    """Validate a recipe given as a mapping."""
    recipe = _build(Recipe, data, "recipe")
    if not isinstance(recipe.tasks, list) or not all(isinstance(t, str) for t in recipe.tasks):
        raise InputError("recipe.tasks must be a list of task specs such as 'ppl:wiki.test.raw'")
    return recipe


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
