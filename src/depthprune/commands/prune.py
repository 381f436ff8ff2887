"""``depthprune prune``: remove blocks and export a standard checkpoint."""

from __future__ import annotations

import argparse

from depthprune.commands import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove blocks and write a standard Hugging Face checkpoint")
    add_model_args(p)
    p.add_argument("--remove", help="comma-separated units to remove, e.g. block.3,block.5")
    p.add_argument("--plan", help="a plan.json from `depthprune plan` (or written by hand); instead of --remove")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed and write nothing")
    p.set_defaults(func=_run_prune)


def _run_prune(args: argparse.Namespace) -> None:
    from depthprune.api import prune_model

    result = prune_model(
        args.model,
        remove=args.remove,
        plan=args.plan,
        out=args.output,
        force=args.force,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        dry_run=args.dry_run,
    )
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {', '.join(map(str, result.removed))}: {result.n_layers_before} -> {result.n_layers_after} layers, "
        f"{result.params_before:,} -> {result.params_after:,} parameters"
        + ("" if args.dry_run else f"; wrote {args.output}")
    )
