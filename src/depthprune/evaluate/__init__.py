"""The ``evaluate`` stage: perplexity, MMLU and lm-evaluation-harness tasks, by spec string.

A task is named by a spec ``KIND:TARGET[,key=value]...`` (see :mod:`depthprune.evaluate.spec`):

- ``ppl:PATH`` -- perplexity on a text file, folder or dataset; options are the fields
  of :class:`PerplexityConfig` (``seq_len``, ``stride``, ``bos``, ``documents``,
  ``max_tokens``, ``strip``, ``batch_size``, ``text_field``).
- ``mmlu:PATH`` -- MMLU in the paper's 5-shot protocol on a local folder or
  ``cais/mmlu``; options from :class:`MMLUConfig` (``limit``, ``shots``, ``subjects``
  joined with ``+``, ``split``, ``max_length``, ``batch_size``, ``reuse_prefix``).
- ``hellaswag:PATH`` -- HellaSwag 0-shot ``acc_norm`` and ``acc`` on the 6-line text file
  (``.txt``/``.txt.bz2``) or JSON Lines of Hub rows, scored as lm-evaluation-harness's
  ``hellaswag`` task; options from :class:`HellaSwagConfig` (``limit``, ``max_length``,
  ``batch_size``).
- ``lm_eval:TASK`` -- any lm-evaluation-harness task; options from
  :class:`HarnessConfig` (``include_path``, ``limit``, ``shots``, ``batch_size``,
  ``max_length``, ``bootstrap_iters``, ``seed``).

Every result is a dict with ``task`` (the kind), ``spec``, the numbers, and
``protocol``: everything needed to reproduce the number. :func:`task_score` reads the
headline number of any result.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from depthprune import __version__
from depthprune.errors import InputError
from depthprune.evaluate.harness import HarnessConfig, evaluate_harness
from depthprune.evaluate.hellaswag import HellaSwagConfig, evaluate_hellaswag
from depthprune.evaluate.mmlu import MMLUConfig, MMLUQuestion, evaluate_mmlu, load_mmlu
from depthprune.evaluate.perplexity import PerplexityConfig, perplexity
from depthprune.evaluate.spec import RawSpec, build_config, option_fields, split_spec
from depthprune.registry import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "HarnessConfig",
    "HellaSwagConfig",
    "MMLUConfig",
    "MMLUQuestion",
    "PerplexityConfig",
    "TaskKind",
    "TaskSpec",
    "evaluate",
    "evaluate_harness",
    "evaluate_hellaswag",
    "evaluate_mmlu",
    "get_task_kind",
    "load_mmlu",
    "parse_task",
    "perplexity",
    "task_score",
]

RunFn = Callable[[nn.Module, Any, str, Any], dict[str, Any]]
DEEPER_LOOK = "Siddiqui et al. 2024, A deeper look at depth pruning of LLMs (arXiv 2407.16286)"


@dataclass(frozen=True)
class TaskKind:
    """One registered kind of task.

    Attributes:
        name: The ``KIND`` of a spec.
        config_cls: Frozen config dataclass; its fields are the spec's options.
        run: ``run(model, tokenizer, target, config) -> result dict``.
        headline: The result key that :func:`task_score` returns.
        target: What ``TARGET`` is, for help text.
        description: One line on what is measured.
        reference: Where the protocol comes from.
    """

    name: str
    config_cls: type
    run: RunFn
    headline: str
    target: str
    description: str
    reference: str

    @property
    def options(self) -> list[str]:
        return list(option_fields(self.config_cls))


TASKS: Registry[TaskKind] = Registry("task kind")


def task_kind(
    name: str, config_cls: type, headline: str, target: str, description: str, reference: str
) -> Callable[[RunFn], RunFn]:
    """Register the decorated ``run(model, tokenizer, target, config)`` as a task kind."""

    def add(fn: RunFn) -> RunFn:
        TASKS.add(name, TaskKind(name, config_cls, fn, headline, target, description, reference))
        return fn

    return add


def get_task_kind(name: str) -> TaskKind:
    """Look a task kind up, suggesting the closest name on a miss."""
    return TASKS.get(name)


@task_kind(
    "ppl",
    PerplexityConfig,
    headline="perplexity",
    target="a .txt/.jsonl file, a folder of them, or a dataset name[:config][@split]",
    description="perplexity, exp(mean NLL) of the scored tokens; windows of seq_len tokens every stride tokens",
    reference="Hugging Face guide 'Perplexity of fixed-length models'; WikiText-2 raw test file as it is",
)
def _run_ppl(model: nn.Module, tokenizer: Any, target: str, config: PerplexityConfig) -> dict[str, Any]:
    return perplexity(model, tokenizer, target, config)


@task_kind(
    "mmlu",
    MMLUConfig,
    headline="accuracy",
    target="a folder with dev/ and test/ <subject>_<split>.csv files, or cais/mmlu",
    description="MMLU micro accuracy, 5-shot prompt of Hendrycks et al., argmax over the answer letters",
    reference=DEEPER_LOOK,
)
def _run_mmlu(model: nn.Module, tokenizer: Any, target: str, config: MMLUConfig) -> dict[str, Any]:
    return evaluate_mmlu(model, tokenizer, target, config)


@task_kind(
    "hellaswag",
    HellaSwagConfig,
    headline="acc_norm",
    target="hellaswag_val_full.txt(.bz2) (6-line records), a .jsonl of Hub rows, or a folder holding one",
    description="HellaSwag 0-shot acc_norm (log-likelihood per character of each ending), as lm-eval's hellaswag",
    reference="Zellers et al. 2019, HellaSwag; lm-evaluation-harness hellaswag task",
)
def _run_hellaswag(model: nn.Module, tokenizer: Any, target: str, config: HellaSwagConfig) -> dict[str, Any]:
    return evaluate_hellaswag(model, tokenizer, target, config)


@task_kind(
    "lm_eval",
    HarnessConfig,
    headline="score",
    target="an lm-evaluation-harness task, group or tag name, or a task YAML file",
    description="the task's main metric (first of its metric_list) from lm-evaluation-harness",
    reference="EleutherAI lm-evaluation-harness",
)
def _run_lm_eval(model: nn.Module, tokenizer: Any, target: str, config: HarnessConfig) -> dict[str, Any]:
    return evaluate_harness(model, tokenizer, target, config)


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task spec: its kind, target and typed config."""

    text: str
    kind: str
    target: str
    config: Any


def parse_task(text: str, defaults: dict[str, Any] | None = None) -> TaskSpec:
    """Parse ``KIND:TARGET[,key=value]...`` into a :class:`TaskSpec`.

    Args:
        text: The spec string.
        defaults: Config values for options that the spec leaves out (e.g. a
            ``batch_size`` given once for all tasks); keys the kind lacks are ignored.

    Raises:
        InputError: malformed spec, unknown kind or option (with a did-you-mean), bad value.
    """
    raw: RawSpec = split_spec(text, list(TASKS))
    kind = get_task_kind(raw.kind)
    config = build_config(kind.config_cls, raw, defaults)
    return TaskSpec(raw.text, raw.kind, raw.target, config)


def task_score(result: dict[str, Any]) -> float:
    """The headline number of a result: perplexity, MMLU micro accuracy, HellaSwag
    acc_norm, or the harness task's main metric. ``result["higher_is_better"]`` says which way is better."""
    kind = result.get("task")
    if not isinstance(kind, str):
        raise InputError("result has no 'task' field; expected a dict returned by evaluate()")
    return float(result[get_task_kind(kind).headline])


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str | TaskSpec],
    batch_size: int | None = None,
    show_progress: bool = True,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Evaluate an in-memory model (masked or pruned as it is) on task specs.

    Every spec is parsed before any work starts, so a typo fails at once.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer.
        tasks: Spec strings such as ``ppl:wiki.test.raw,seq_len=1024`` or parsed specs.
        batch_size: Batch size for every task whose spec does not set one.
        show_progress: Show progress bars on a terminal.
        model_name: Recorded in the result.

    Returns:
        ``{"model", "tasks": {spec: result}, "meta": {"version", "created"}}``; each
        result carries ``spec``, ``seconds`` and its ``protocol``.
    """
    defaults: dict[str, Any] = {"show_progress": show_progress}
    if batch_size is not None:
        defaults["batch_size"] = batch_size
    specs = [t if isinstance(t, TaskSpec) else parse_task(t, defaults) for t in tasks]
    if not specs:
        raise InputError("no task given; expected specs such as ppl:wiki.test.raw or mmlu:data/mmlu")
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for spec in specs:
            start = time.perf_counter()
            result = TASKS.get(spec.kind).run(model, tokenizer, spec.target, spec.config)
            key = spec.text if spec.text not in results else f"{spec.text}#{len(results)}"
            results[key] = {**result, "spec": spec.text, "seconds": round(time.perf_counter() - start, 3)}
            logger.info("%s: %.4f (%.1fs)", spec.text, task_score(result), results[key]["seconds"])
    finally:
        model.train(was_training)
    return {
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", None),
        "tasks": results,
        "meta": {
            "version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }
