"""Any lm-evaluation-harness task, run on the in-memory model through its HFLM wrapper.

The model is not reloaded: ``HFLM(pretrained=model, tokenizer=...)`` wraps the object in
memory, so masked units stay masked and pruned models are evaluated as they are. Local
tasks come from ``include_path`` (a folder of task YAML files whose ``dataset_path`` is
e.g. ``csv`` or ``json`` with local ``data_files``), which runs with no network.
"""

from __future__ import annotations

import copy
import difflib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from depthprune.errors import InputError, first_line
from depthprune.evaluate._model import model_device

logger = logging.getLogger(__name__)

__all__ = ["HarnessConfig", "evaluate_harness", "main_metric"]

REFERENCE = "EleutherAI lm-evaluation-harness (simple_evaluate on the HFLM wrapper of the in-memory model)"


@dataclass(frozen=True)
class HarnessConfig:
    """How lm-evaluation-harness runs.

    Attributes:
        include_path: A folder of extra task YAML files (searched before the built-in
            tasks are indexed, which takes seconds).
        limit: Documents per task (the first ones); all when ``None``.
        shots: Few-shot examples, overriding the task's ``num_fewshot``.
        batch_size: Requests per forward pass.
        max_length: Context of the model as lm-eval sees it; default: from its config.
        bootstrap_iters: Bootstrap resamples for standard errors (0: none, fast).
        log_samples: Keep lm-eval's per-document records in the result (``samples``).
        seed: Seed of lm-eval's random, numpy, torch and few-shot generators.
    """

    include_path: str | None = None
    limit: int | None = None
    shots: int | None = None
    batch_size: int = 8
    max_length: int | None = None
    bootstrap_iters: int = 0
    log_samples: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be at least 1, got {self.limit}")
        if self.shots is not None and self.shots < 0:
            raise InputError(f"shots must be 0 or more, got {self.shots}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise InputError(f"include_path {self.include_path!r} is not a folder; give the folder holding the task YAML files")


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise InputError("lm-eval tasks need lm-evaluation-harness: pip install 'depthprune[eval]'") from exc
    return lm_eval


def _is_yaml_file(name: str) -> bool:
    path = Path(name).expanduser()
    return path.suffix in (".yaml", ".yml") and path.is_file()


def _task_manager(names: list[str], include_path: str | None) -> Any:
    """A TaskManager that knows every name; indexes the built-in tasks only if needed."""
    from lm_eval.tasks import TaskManager

    wanted = [n for n in names if not _is_yaml_file(n)]
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in wanted):
            return local
    manager = TaskManager(include_path=include_path)
    for name in wanted:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f" Did you mean: {close[0]}? Close names: {', '.join(close)}." if close else ""
            where = f" or in include_path {include_path!r} (a YAML file that does not parse is skipped)" if include_path else ""
            raise InputError(f"unknown lm-eval task {name!r}: not among lm-eval's {len(manager.all_tasks)} tasks{where}.{hint}")
    return manager


def main_metric(results: dict[str, Any], name: str) -> tuple[str, float, bool]:
    """The headline metric of task (or group) ``name`` in lm-eval's results.

    It is the first entry of the task's ``metric_list`` (with its first filter, usually
    ``none``); for a group, or a task without one, the first metric reported.

    Returns:
        ``(key, value, higher_is_better)``, e.g. ``("acc,none", 0.25, True)``.
    """
    table = results.get("results", {})
    if name not in table:
        if not table:
            raise InputError(f"lm-eval returned no results for {name!r}")
        name = next(iter(table))
    values = {k: v for k, v in table[name].items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    if not values:
        raise InputError(f"lm-eval reported no numeric metric for {name!r}")
    metric_list = results.get("configs", {}).get(name, {}).get("metric_list") or []
    preferred = [m["metric"] for m in metric_list if isinstance(m, dict) and isinstance(m.get("metric"), str)]
    key = next((k for m in preferred for k in values if k.split(",")[0] == m), next(iter(values)))
    higher = results.get("higher_is_better", {}).get(name, {}).get(key.split(",")[0], True)
    return key, float(values[key]), bool(higher)


def _jsonable(value: Any) -> Any:
    """lm-eval's results with anything that JSON cannot hold turned into strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def evaluate_harness(model: nn.Module, tokenizer: Any, tasks: str | list[str], config: HarnessConfig | None = None) -> dict[str, Any]:
    """Run lm-evaluation-harness task(s) on the in-memory model.

    Args:
        model: A Hugging Face causal LM (masked or pruned as it is).
        tokenizer: Its tokenizer (copied, since lm-eval may give it a pad token).
        tasks: Task, group or tag names, or paths to task YAML files.
        config: Include path, limit, shots, batch size.

    Returns:
        ``{"task": "lm_eval", "tasks", "score", "metric", "higher_is_better", "results",
        "groups", "n_samples", "protocol", ["samples"]}``: ``results`` maps each task to
        its metrics (lm-eval's ``metric,filter`` keys); ``score`` is the first task's
        :func:`main_metric`.

    Raises:
        InputError: lm-eval is missing, a task is unknown, or its data cannot be loaded.
    """
    config = config or HarnessConfig()
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise InputError("no lm-eval task given; expected a task name such as hellaswag")
    if tokenizer is None:
        raise InputError("the model has no tokenizer; lm-eval needs one")
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    include = str(Path(config.include_path).expanduser()) if config.include_path else None
    manager = _task_manager(names, include)
    lm = HFLM(
        pretrained=model,
        tokenizer=copy.deepcopy(tokenizer),
        batch_size=config.batch_size,
        max_length=config.max_length,
        device=str(model_device(model)),
    )
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=config.shots,
            limit=config.limit,
            bootstrap_iters=config.bootstrap_iters,
            log_samples=config.log_samples,
            task_manager=manager,
            random_seed=config.seed,
            numpy_random_seed=config.seed,
            torch_random_seed=config.seed,
            fewshot_random_seed=config.seed,
        )
    except (FileNotFoundError, KeyError, ValueError) as exc:
        first = first_line(exc)
        raise InputError(f"lm-eval could not run {', '.join(names)}: {first}; check the task YAML and its data files") from exc
    if out is None:
        raise InputError("lm-eval returned no results (not the main process)")
    key, score, higher = main_metric(out, _result_name(names[0], out))
    result: dict[str, Any] = {
        "task": "lm_eval",
        "tasks": names,
        "score": score,
        "metric": key,
        "higher_is_better": higher,
        "results": _jsonable(out.get("results", {})),
        "groups": _jsonable(out.get("groups", {})),
        "n_samples": _jsonable(out.get("n-samples", {})),
        "protocol": {
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "n_shot": _jsonable(out.get("n-shot", {})),
            "versions": _jsonable(out.get("versions", {})),
            "max_length": lm.max_length,
            "reference": REFERENCE,
            "config": asdict(config),
        },
    }
    if config.log_samples:
        result["samples"] = _jsonable(out.get("samples", {}))
    logger.info("lm-eval %s: %s = %.4f", names[0], key, score)
    return result


def _result_name(name: str, out: dict[str, Any]) -> str:
    """The key under which lm-eval reports the task given as ``name`` (a YAML path or a name)."""
    if name in out.get("results", {}) or not _is_yaml_file(name):
        return name
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(name).expanduser(), resolve_func=False)
    return str(cfg.get("task") or cfg.get("group") or name)
