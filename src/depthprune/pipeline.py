"""Running a recipe: every stage into one folder, resumable, ending in report.html.

Layout of the output folder::

    recipe.json     the validated recipe
    stages.json     per stage, the hash of the settings its outputs were made with
    scores.json     scores.png
    plan.json
    model/          the pruned (and recovered) model
    eval.json       tasks, size, KV cache and prefill/decode tokens/s of the original and pruned models
    sweep/          sweep.json and one PNG per task
    report.html
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune._fs import check_target, make_dir, write_json_atomic
from depthprune.api import PruneConfig, prune_model
from depthprune.architectures import num_layers
from depthprune.devices import input_device
from depthprune.errors import InputError
from depthprune.loading import LoadConfig, load_model
from depthprune.recipe import Recipe, settings_hash

logger = logging.getLogger(__name__)

STAGES = ("score", "plan", "prune", "evaluate", "sweep", "findings", "report")


@torch.no_grad()
def kv_cache_bytes_per_token(model: nn.Module, n_tokens: int = 16) -> float:
    """Bytes that the KV cache of ``model`` holds per token, measured on a short forward."""
    from transformers import DynamicCache

    ids = torch.arange(3, 3 + n_tokens).unsqueeze(0) % model.config.vocab_size
    cache = DynamicCache(config=model.config)
    model(ids.to(input_device(model)), cache=cache, use_cache=True)
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / n_tokens


@dataclass
class RunContext:
    """The state shared by the stages of one run.

    Build it with :meth:`of`, which turns the recipe into the configs of the stages once.
    """

    recipe: Recipe
    out: Path
    load: LoadConfig
    prune: PruneConfig
    show_progress: bool = True
    _loaded: Any = None
    _data: Any = None

    @classmethod
    def of(cls, recipe: Recipe, out: Path, show_progress: bool = True) -> RunContext:
        """The context of a run of ``recipe`` into ``out``; nothing is read or written.

        Raises:
            InputError: a loading or pruning setting of the recipe is invalid.
        """
        d = recipe.data
        load = LoadConfig(
            recipe.model, dtype=recipe.dtype, device=recipe.device, trust_remote_code=recipe.trust_remote_code  # type: ignore[arg-type]
        )
        prune = PruneConfig(
            out=out / "model",
            plan=out / "plan.json",
            recover=recipe.recover,
            data=d.source if recipe.recover != "none" else None,
            n_samples=d.samples,
            seq_len=d.seq_len,
            seed=d.seed,
            text_field=d.text_field,
            force=True,
            show_progress=show_progress,
        )
        return cls(recipe, out, load, prune, show_progress)

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            self._loaded = load_model(self.load)
        return self._loaded

    @property
    def data(self) -> Any:
        if self._data is None:
            from depthprune.data import context_length, load_calibration

            d = self.recipe.data
            self._data = load_calibration(
                d.source, self.loaded.tokenizer, d.samples, d.seq_len, d.seed, context_length(self.loaded.model), d.text_field
            )
        return self._data


def _stage_score(ctx: RunContext) -> None:
    from depthprune.report import plot_heatmap
    from depthprune.score import ScoreConfig, score, write_scores

    s = ctx.recipe.score
    config = ScoreConfig(
        metrics=tuple(s.metrics), units=tuple(s.units), batch_size=s.batch_size, seed=ctx.recipe.data.seed, show_progress=ctx.show_progress
    )
    result = score(ctx.loaded.model, ctx.data, config, spec=ctx.loaded.spec, model_name=ctx.recipe.model)
    write_scores(result, ctx.out / "scores.json", force=True)
    plot_heatmap(result.to_dict(), ctx.out / "scores.png")


def _stage_plan(ctx: RunContext) -> None:
    from depthprune.plan import PlanConfig, make_plan, write_plan
    from depthprune.scores_file import load_scores

    p = ctx.recipe.plan
    config = PlanConfig(metric=p.metric, units=p.units, remove=_budget(p.remove), keep_first=p.keep_first, keep_last=p.keep_last, replace=ctx.recipe.recover)  # type: ignore[arg-type]
    write_plan(make_plan(load_scores(ctx.out / "scores.json"), config), ctx.out / "plan.json", force=True)


def _stage_prune(ctx: RunContext) -> None:
    prune_model(ctx.load, ctx.prune)


def _load_pruned(ctx: RunContext) -> nn.Module:
    import depthprune

    return depthprune.load(ctx.out / "model", device=ctx.recipe.device)


def _stage_evaluate(ctx: RunContext) -> None:
    from depthprune.evaluate import evaluate
    from depthprune.speed import measure_speed

    original, tok = ctx.loaded.model, ctx.loaded.tokenizer
    pruned = _load_pruned(ctx)
    doc: dict[str, Any] = {}
    for name, m in (("original", original), ("pruned", pruned)):
        doc[name] = {
            "tasks": evaluate(m, tok, ctx.recipe.tasks, show_progress=ctx.show_progress)["tasks"] if ctx.recipe.tasks else {},
            "params": sum(p.numel() for p in m.parameters()),
            "layers": num_layers(m.config),
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(m),
        }
    speed = measure_speed({"original": original, "pruned": pruned}, tok)
    for name in speed:
        doc[name]["speed"] = speed[name]
    write_json_atomic(ctx.out / "eval.json", doc)


def _stage_sweep(ctx: RunContext) -> None:
    from depthprune.evaluate import evaluate, task_score
    from depthprune.scores_file import load_scores
    from depthprune.sweep import SweepConfig, plot_sweep, sweep

    s = ctx.recipe.sweep
    if s is None or not ctx.recipe.tasks:
        return
    tok = ctx.loaded.tokenizer

    def evaluator(model: nn.Module) -> dict[str, dict[str, Any]]:
        res = evaluate(model, tok, ctx.recipe.tasks, show_progress=False)["tasks"]
        return {k: {"score": task_score(v), "higher_is_better": v.get("higher_is_better")} for k, v in res.items()}

    config = SweepConfig(metrics=tuple(s.metrics), units=s.units, max_remove=s.max_remove, tasks=tuple(ctx.recipe.tasks), show_progress=ctx.show_progress)
    result = sweep(ctx.loaded.model, load_scores(ctx.out / "scores.json"), config, evaluator, out_dir=ctx.out / "sweep", model_name=ctx.recipe.model)
    plot_sweep(result, ctx.out / "sweep")


def _stage_findings(ctx: RunContext) -> None:
    from depthprune.data import context_length, load_calibration
    from depthprune.findings import run_findings
    from depthprune.scores_file import load_scores

    f, d = ctx.recipe.findings, ctx.recipe.data
    assert f is not None  # run_recipe skips the stage otherwise
    lm = ctx.loaded
    # Emulators are fitted on other windows than the scores' (another seed).
    emulation_data = load_calibration(
        d.source, lm.tokenizer, f.fit_samples + f.eval_samples, d.seq_len, d.seed + 1, context_length(lm.model), d.text_field
    )
    run_findings(
        lm.model, lm.tokenizer, emulation_data, load_scores(ctx.out / "scores.json"), f, ctx.out / "findings",
        model_name=ctx.recipe.model, default_tasks=ctx.recipe.tasks, show_progress=ctx.show_progress,
    )


def reproduce_commands(recipe: Recipe, out: Path) -> list[str]:
    """The commands that redo the run stage by stage."""
    q = shlex.quote
    r, d = recipe, recipe.data
    cmds = [
        f"depthprune score {q(r.model)} --data {q(d.source)} --samples {d.samples} --seq-len {d.seq_len} --seed {d.seed} "
        f"--metrics {','.join(r.score.metrics)} --units {','.join(r.score.units)} --dtype {r.dtype} -o {q(str(out / 'scores.json'))}",
        f"depthprune plan {q(str(out / 'scores.json'))} --metric {r.plan.metric} --units {r.plan.units} --remove {r.plan.remove:g} "
        f"--keep-first {r.plan.keep_first} --keep-last {r.plan.keep_last} --replace {r.recover} -o {q(str(out / 'plan.json'))}",
        f"depthprune prune {q(r.model)} --plan {q(str(out / 'plan.json'))} --dtype {r.dtype}"
        + (f" --recover {r.recover} --data {q(d.source)} --samples {d.samples} --seq-len {d.seq_len}" if r.recover != "none" else "")
        + f" -o {q(str(out / 'model'))}",
    ]
    for task in r.tasks:
        cmds.append(f"depthprune eval {q(r.model)} --task {q(task)}")
        cmds.append(f"depthprune eval {q(str(out / 'model'))} --task {q(task)}")
    cmds.append(f"# or all at once: depthprune run {q(str(out / 'recipe.json'))} -o {q(str(out))}")
    return cmds


def _stage_report(ctx: RunContext) -> None:
    from depthprune.evaluate import task_score
    from depthprune.html_report import ReportData, write_report
    from depthprune.speed import speed_rows
    from depthprune.sweep import sweep_png_name, task_label

    ev = json.loads((ctx.out / "eval.json").read_text())
    plan = json.loads((ctx.out / "plan.json").read_text())
    data = ReportData(title="depthprune report", model=ctx.recipe.model, plan=plan)
    for name, target in (("original", data.before), ("pruned", data.after)):
        for spec, res in ev[name]["tasks"].items():
            label = f"{task_label(spec)} ({res.get('task')})"
            target[label] = task_score(res)
            if res.get("higher_is_better") is False and label not in data.lower_is_better:
                data.lower_is_better = [*data.lower_is_better, label]
    o, p = ev["original"], ev["pruned"]
    removed_blocks = sum(1 for e in plan.get("remove", []) if e["unit"].startswith("block."))
    data.sizes = [
        ("parameters", o["params"], p["params"]),
        ("blocks computed in full", o["layers"], o["layers"] - removed_blocks),
        ("KV-cache bytes per token", o["kv_cache_bytes_per_token"], p["kv_cache_bytes_per_token"]),
    ]
    data.throughput = speed_rows(o.get("speed"), p.get("speed"))
    data.images = [("Importance of every unit (scores.png)", ctx.out / "scores.png")]
    for task in ctx.recipe.tasks:
        png = ctx.out / "sweep" / sweep_png_name(task, ctx.recipe.tasks)
        if png.is_file():
            data.images.append((f"Sweep: {task_label(task)} against units removed", png))
    data.commands = reproduce_commands(ctx.recipe, ctx.out)
    data.notes = [f"calibration: {json.loads((ctx.out / 'scores.json').read_text())['calibration']}"]
    write_report(data, ctx.out / "report.html")


_RUNNERS: dict[str, Callable[[RunContext], None]] = {
    "score": _stage_score,
    "plan": _stage_plan,
    "prune": _stage_prune,
    "evaluate": _stage_evaluate,
    "sweep": _stage_sweep,
    "findings": _stage_findings,
    "report": _stage_report,
}
_OUTPUTS = {
    "score": ("scores.json", "scores.png"),
    "plan": ("plan.json",),
    "prune": ("model/depthprune.json",),
    "evaluate": ("eval.json",),
    "sweep": (),
    "findings": ("findings/findings.json", "findings/findings.md"),
    "report": ("report.html",),
}


def _valid(path: Path) -> bool:
    if not path.exists():
        return False
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
    return True


def preflight(ctx: RunContext) -> None:
    """Check everything that can be checked before any work, so bad input writes nothing:
    the model's config and family, the local data path, the task specs and every stage's
    settings (loading and pruning ones were checked when ``ctx`` was built).

    Raises:
        DepthPruneError: the first problem found.
    """
    from depthprune.architectures import spec_for_config
    from depthprune.data import _DATASET_ID
    from depthprune.errors import InputError
    from depthprune.evaluate import parse_task
    from depthprune.loading import load_config
    from depthprune.plan import PlanConfig
    from depthprune.score import ScoreConfig
    from depthprune.sweep import SweepConfig, removal_counts

    recipe = ctx.recipe
    config, _ = load_config(ctx.load)
    n_layers = spec_for_config(config).num_layers(config)
    source = recipe.data.source
    if not Path(source).expanduser().exists() and not _DATASET_ID.match(source):
        raise InputError(f"data path {source!r} does not exist")
    for task in recipe.tasks:
        parse_task(task)
    ScoreConfig(metrics=tuple(recipe.score.metrics), units=tuple(recipe.score.units), batch_size=recipe.score.batch_size)
    p = recipe.plan
    PlanConfig(metric=p.metric, units=p.units, remove=_budget(p.remove), keep_first=p.keep_first, keep_last=p.keep_last)  # type: ignore[arg-type]
    if p.metric not in recipe.score.metrics:
        raise InputError(f"plan.metric {p.metric!r} is not among score.metrics ({', '.join(recipe.score.metrics)})")
    _check_plan_budget(p, n_layers)
    if recipe.sweep is not None:
        s = recipe.sweep
        removal_counts(SweepConfig(metrics=tuple(s.metrics), units=s.units, max_remove=s.max_remove), n_layers)
        missing = [m for m in s.metrics if m not in recipe.score.metrics]
        if missing:
            raise InputError(f"sweep.metrics {missing} are not among score.metrics ({', '.join(recipe.score.metrics)})")
    if recipe.findings is not None:
        from depthprune.findings import check_section

        check_section(recipe.findings, recipe.tasks, recipe.score.metrics, recipe.score.units)


def _check_plan_budget(p: Any, n_layers: int) -> None:
    """A plan count that cannot fit the model, refused before the run folder exists."""
    budget = _budget(p.remove)
    if not isinstance(budget, int):
        return
    candidates = n_layers - p.keep_first - p.keep_last
    if budget > candidates or (p.units == "block" and budget >= n_layers):
        most = min(candidates, n_layers - 1) if p.units == "block" else candidates
        raise InputError(
            f"plan.remove {budget} {p.units} units cannot be met: the model has {n_layers} layers "
            f"(keep_first={p.keep_first}, keep_last={p.keep_last}); give at most {max(most, 0)}"
        )


def _budget(remove: float) -> int | float:
    """A plan budget: a whole number >= 1 is a count, anything else a fraction."""
    return int(remove) if float(remove).is_integer() and remove >= 1 else float(remove)


def run_recipe(
    recipe: Recipe,
    out: str | os.PathLike[str],
    show_progress: bool = True,
    on_stage: Callable[[str, bool], None] | None = None,
) -> Path:
    """Run every stage of ``recipe`` into ``out``, skipping stages that are already done.

    Args:
        recipe: The validated recipe.
        out: The run folder (created if missing; its parent must exist).
        show_progress: Show progress bars on a terminal.
        on_stage: Called with ``(stage, skipped)`` before each stage (the CLI reports it).

    Returns:
        The path of ``report.html`` (or of the folder when the report is off).
    """
    folder = check_target(out, "dir", models=[recipe.model])
    ctx = RunContext.of(recipe, folder, show_progress)
    preflight(ctx)
    make_dir(folder, models=[recipe.model])
    write_json_atomic(folder / "recipe.json", recipe.to_dict())
    stages_path = folder / "stages.json"
    done: dict[str, str] = json.loads(stages_path.read_text()) if _valid(stages_path) else {}
    for stage in STAGES:
        if stage == "report" and not recipe.report:
            continue
        key = settings_hash(recipe.stage_settings(stage))
        if stage == "sweep" and (recipe.sweep is None or not recipe.tasks):
            continue
        if stage == "findings" and recipe.findings is None:
            continue
        complete = done.get(stage) == key and all(_valid(folder / o) for o in _OUTPUTS[stage])
        if on_stage:
            on_stage(stage, complete)
        if complete:
            logger.info("stage %s is done; skipped", stage)
            continue
        _RUNNERS[stage](ctx)
        done[stage] = key
        write_json_atomic(stages_path, done)
    return folder / "report.html" if recipe.report else folder
