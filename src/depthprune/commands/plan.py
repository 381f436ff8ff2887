"""``depthprune plan``: choose units to remove from scores.json."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose the least important units from scores.json and write plan.json")
    p.add_argument("scores", help="scores.json written by `depthprune score`")
    p.add_argument("--metric", required=True, help="the metric to rank units by (higher = more important)")
    p.add_argument("--units", default="block", choices=["block", "attn", "mlp"], help="kind of unit to remove (default: block)")
    p.add_argument(
        "--remove",
        metavar="K|FRACTION",
        help="how many to remove: a count K (e.g. 4) or a fraction of the candidates (e.g. 0.25); "
        "a span metric removes one span",
    )
    p.add_argument("--keep-first", type=int, default=0, metavar="N", help="never remove units of the first N layers")
    p.add_argument("--keep-last", type=int, default=0, metavar="N", help="never remove units of the last N layers")
    p.add_argument(
        "--replace",
        default="none",
        metavar="none|bias|lowrank:R|linear:R",
        help="what replaces each removed unit: none, bias, lowrank:R or linear:R|linear:full (default: none)",
    )
    p.add_argument("-o", "--output", help="the plan file to write (required unless --dry-run)")
    p.add_argument("--force", action="store_true", help="replace an existing plan file")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> None:
    from depthprune._fs import check_output
    from depthprune.errors import InputError
    from depthprune.plan import (
        PlanConfig,
        format_plan,
        make_plan,
        parse_budget,
        write_plan,
    )
    from depthprune.scores_file import load_scores

    if not args.dry_run and not args.output:
        raise InputError("no output given; pass -o plan.json, or --dry-run to only print the plan")
    scores = load_scores(args.scores)
    if not args.dry_run:
        check_output(args.output, args.force, "file", models=[scores.get("model")], inputs=[args.scores])
    config = PlanConfig(
        metric=args.metric,
        units=args.units,
        remove=None if args.remove is None else parse_budget(args.remove),
        keep_first=args.keep_first,
        keep_last=args.keep_last,
        replace=args.replace,
    )
    plan = make_plan(scores, config)
    if args.dry_run:
        print(format_plan(plan))
        return
    write_plan(plan, args.output, force=args.force)
    units = [e["unit"] for e in plan["remove"]]
    print(f"plan: remove {', '.join(units)} (lowest {config.metric}); wrote {args.output}")
