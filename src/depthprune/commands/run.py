"""``depthprune run``: the whole job from a recipe file (or flags), resumable."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="score, plan, prune, recover, evaluate, sweep and report from one recipe",
        description="Runs every stage into one folder. A stage whose outputs are present and were made "
        "with the same settings is skipped, so a killed run resumes. Flags override the recipe.",
    )
    p.add_argument("recipe", nargs="?", help="recipe.yaml (or .json); optional when --model and --data are given")
    p.add_argument("-o", "--output", required=True, help="run folder")
    p.add_argument("--model", help="override recipe.model")
    p.add_argument("--data", help="override recipe.data.source")
    p.add_argument("--task", action="append", help="evaluation task spec (repeatable); overrides recipe.tasks")
    p.add_argument("--recover", help="override recipe.recover: none, bias, lowrank:R or linear:R|linear:full")
    p.add_argument("--metric", help="override recipe.plan.metric")
    p.add_argument("--units", help="override recipe.plan.units")
    p.add_argument("--remove", type=float, help="override recipe.plan.remove (a count, or a fraction < 1)")
    p.add_argument("--device", help="override recipe.device, e.g. cuda")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="override recipe.dtype")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, print it and run nothing")
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if args.model:
        data["model"] = args.model
    if args.data:
        data.setdefault("data", {})["source"] = args.data
    if args.task:
        data["tasks"] = args.task
    if args.recover:
        data["recover"] = args.recover
    for key in ("device", "dtype"):
        if getattr(args, key):
            data[key] = getattr(args, key)
    for key in ("metric", "units", "remove"):
        if getattr(args, key) is not None:
            data.setdefault("plan", {})[key] = getattr(args, key)
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run(args: argparse.Namespace) -> None:
    import json

    from depthprune.errors import InputError
    from depthprune.recipe import read_recipe_file, recipe_from_dict

    base: dict[str, Any] = read_recipe_file(args.recipe) if args.recipe else {}
    if not args.recipe and not (args.model and args.data):
        raise InputError("give a recipe file, or at least --model and --data")
    recipe = recipe_from_dict(_merge(base, _overrides(args)))
    if args.dry_run:
        print(json.dumps(recipe.to_dict(), indent=2))
        return

    execute(recipe, args.output, args.quiet)


def execute(recipe: Any, out: str, quiet: bool) -> None:
    """Run ``recipe`` into ``out``, saying which stage runs or is skipped (shared by `demo`)."""
    from depthprune.pipeline import run_recipe

    def announce(stage: str, skipped: bool) -> None:
        if not quiet:
            print(f"[{stage}] " + ("done before; skipped" if skipped else "running"), flush=True)

    report = run_recipe(recipe, out, show_progress=not quiet, on_stage=announce)
    print(f"wrote {report}")
