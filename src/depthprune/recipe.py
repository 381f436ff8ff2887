"""Recipes: the whole job (score, plan, prune, recover, evaluate, sweep, report) from one file.

A recipe is a YAML (or JSON) mapping validated against the pydantic models below, before
anything is written: every key's type and range is checked, and an unknown key is refused
with a did-you-mean. ``run_recipe`` runs the stages in order into one
output folder. A stage whose outputs are present and were made from the same settings
(recorded in ``stages.json``) is skipped, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
)

from depthprune.errors import DepthPruneError, InputError, unknown_choice
from depthprune.findings import FindingsSection

# Strict scalars: "32" is not a count and "yes" not a boolean; an int is a valid float.
UnitKind = Literal["block", "attn", "mlp"]
Int = Annotated[int, Strict()]
Count = Annotated[int, Strict(), Field(ge=1)]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Name = Annotated[str, Strict(), Field(min_length=1)]


class _Section(BaseModel):
    """A recipe section: strict scalar types, and unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(_Section):
    """Calibration data: ``source`` as for ``depthprune score --data``."""

    source: Name
    samples: Count = 32
    seq_len: Annotated[int, Strict(), Field(ge=2)] = 256
    seed: Annotated[int, Strict(), Field(ge=0)] = 0
    text_field: Name = "text"


class ScoreSection(_Section):
    metrics: Annotated[list[Name], Field(min_length=1)] = Field(
        default_factory=lambda: ["cosine", "angular", "rel_l1", "rel_l2", "loo_loss"]
    )
    units: Annotated[list[UnitKind], Field(min_length=1)] = Field(default_factory=lambda: ["block", "attn", "mlp"])
    batch_size: Count = 8


def _check_budget(value: float, example: str) -> float:
    if not (value >= 1 and float(value).is_integer()) and not 0 < value < 1:
        raise ValueError(f"a count (a whole number >= 1) or a fraction in (0, 1), e.g. {example}")
    return value


class PlanSection(_Section):
    metric: Name = "loo_loss"
    units: UnitKind = "block"
    remove: Float = 1
    keep_first: Annotated[int, Strict(), Field(ge=0)] = 0
    keep_last: Annotated[int, Strict(), Field(ge=0)] = 0

    @field_validator("remove")
    @classmethod
    def _remove(cls, value: float) -> float:
        return _check_budget(value, "2 (units) or 0.25 (of the candidates)")


class SweepSection(_Section):
    """``units``: one kind, ``"block,attn,mlp"`` or a list; ``max_remove``: a count per kind
    or a fraction in (0, 1) of each kind's units (see :class:`depthprune.sweep.SweepConfig`)."""

    metrics: Annotated[list[Name], Field(min_length=1)] = Field(default_factory=lambda: ["cosine", "rel_l2", "loo_loss"])
    units: Name | Annotated[list[UnitKind], Field(min_length=1)] = "block"
    max_remove: Int | Float = 2

    @field_validator("max_remove")
    @classmethod
    def _max_remove(cls, value: float) -> float:
        return _check_budget(value, "2 (units of each kind) or 0.33 (of each kind's units)")


class Recipe(_Section):
    """One pruning job.

    Attributes:
        model: A local model folder or a Hub id.
        data: Calibration data.
        tasks: Evaluation task specs (see ``depthprune eval``), run before and after.
        recover: ``none``, ``bias``, ``lowrank:R`` or ``linear:R`` for the removed units.
        score, plan, sweep: Stage settings; ``sweep: null`` skips the sweep.
        findings: The paper's findings measured on this model (see
            :mod:`depthprune.findings`); ``null`` (the default) skips them.
        dtype, device, trust_remote_code: Model loading.
        report: Write ``report.html``.
    """

    model: Name
    data: DataSection
    tasks: list[Name] = Field(default_factory=list)
    recover: Name = "none"
    score: ScoreSection = Field(default_factory=ScoreSection)
    plan: PlanSection = Field(default_factory=PlanSection)
    sweep: SweepSection | None = Field(default_factory=SweepSection)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: Name = "cpu"
    trust_remote_code: Bool = False
    report: Bool = True
    # A dataclass with its own checks (FindingsSection.__post_init__), built from a mapping.
    findings: FindingsSection | None = None

    @field_validator("recover")
    @classmethod
    def _recover(cls, value: str) -> str:
        from depthprune.plan import REPLACE_HELP, check_replace

        try:
            return check_replace(value)
        except InputError:
            raise ValueError(REPLACE_HELP) from None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON-able data (written as the run's ``recipe.json``)."""
        return self.model_dump(mode="json")

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings a stage's output depends on (its resume key)."""
        doc = self.to_dict()
        base = {"model": self.model, "dtype": self.dtype, "data": doc["data"]}
        if stage == "score":
            return {**base, "score": doc["score"]}
        if stage == "plan":
            return {**self.stage_settings("score"), "plan": doc["plan"]}
        if stage == "prune":
            return {**self.stage_settings("plan"), "recover": self.recover}
        if stage == "evaluate":
            return {**self.stage_settings("prune"), "tasks": self.tasks}
        if stage == "report":
            return doc
        if stage == "findings":
            return {**self.stage_settings("score"), "tasks": self.tasks, "findings": doc["findings"]}
        if stage == "sweep":
            return {**self.stage_settings("score"), "tasks": self.tasks, "sweep": doc["sweep"]}
        raise ValueError(stage)


_SECTIONS: dict[str, type[BaseModel]] = {"data": DataSection, "score": ScoreSection, "plan": PlanSection, "sweep": SweepSection}


def _fields_of(section: str) -> list[str]:
    """The keys of a recipe section (``""`` for the top level)."""
    if section == "findings":
        return [f.name for f in dataclasses.fields(FindingsSection)]
    return list(_SECTIONS.get(section, Recipe).model_fields)


_PYDANTIC_NAMES = {"str", "int", "float", "bool", "list", "none"}


def _key_path(loc: tuple[Any, ...]) -> str:
    """``data.samples`` from pydantic's error location, without its union-member tags."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _PYDANTIC_NAMES)]
    parts = [p for p in parts if not p[:1].isupper()]  # model-name tags such as SweepSection
    return ".".join(parts)


def _expected(msg: str) -> str:
    for prefix in ("Input should be ", "Value error, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg[:1].lower() + msg[1:]


def _recipe_error(exc: ValidationError) -> DepthPruneError:
    """One line for the first problem pydantic found: the key path, the value, what is expected."""
    errors = exc.errors()
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, DepthPruneError):  # raised by a section's own checks
        return cause
    path = _key_path(first["loc"])
    parent, _, key = path.rpartition(".")
    where = parent or "recipe"
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return unknown_choice("key", key, _fields_of(parent), f" in {where}")
    if first["type"] == "missing":
        return InputError(f"{where} is missing the required key {key!r}")
    value = first.get("input")
    if first["type"] in ("model_type", "dataclass_type", "model_attributes_type", "dataclass_exact_type"):
        return InputError(f"recipe key {path} must be a mapping, got {type(value).__name__}")
    if first["type"] == "list_type":
        return InputError(f"recipe key {path} must be a list, got {type(value).__name__} {value!r}")
    # A union reports one error per member at the same key: "a string or a list".
    same = [e for e in errors if _key_path(e["loc"]) == path]
    expected = " or ".join(dict.fromkeys(_expected(e["msg"]) for e in same))
    return InputError(f"recipe key {path} is {value!r}; expected {expected}")


def read_recipe_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe file (YAML or JSON) as a mapping, without validating its keys.

    Raises:
        InputError: the file is missing, is not UTF-8, is not valid YAML, or is not a mapping.
    """
    import yaml

    from depthprune.data import read_utf8

    p = Path(path)
    if not p.is_file():
        raise InputError(f"recipe {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(read_utf8(p)) or {}
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
    """Validate a recipe given as a mapping: every key, with its type and range.

    Raises:
        InputError: the first problem, in one line naming the key path (``data.samples``),
            the value given and what is expected.
    """
    if not isinstance(data, dict):
        raise InputError(f"a recipe must be a mapping of settings, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _recipe_error(exc) from None


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
