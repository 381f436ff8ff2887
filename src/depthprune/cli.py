"""The ``depthprune`` command line. Each subcommand parses flags and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from depthprune import __version__
from depthprune.errors import DepthPruneError

_COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(name: str) -> Callable[[Callable[[argparse._SubParsersAction], None]], Callable]:
    """Register a function that adds one subcommand to the parser."""

    def register(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
        _COMMANDS[name] = fn
        return fn

    return register


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a local model folder or a Hugging Face Hub id")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow code from the model repository to run (off by default)"
    )


@command("prune")
def _prune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove blocks and write a standard Hugging Face checkpoint")
    _add_model_args(p)
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


@command("plan")
def _plan_parser(sub: argparse._SubParsersAction) -> None:
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
        metavar="none|bias|lowrank:R",
        help="what replaces each removed unit: none, bias or lowrank:R (default: none)",
    )
    p.add_argument("-o", "--output", help="the plan file to write (required unless --dry-run)")
    p.add_argument("--force", action="store_true", help="replace an existing plan file")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> None:
    from depthprune._fs import check_output
    from depthprune.errors import InputError
    from depthprune.plan import PlanConfig, format_plan, load_scores, make_plan, parse_budget, write_plan

    if not args.dry_run:
        if not args.output:
            raise InputError("no output given; pass -o plan.json, or --dry-run to only print the plan")
        check_output(args.output, args.force)
    config = PlanConfig(
        metric=args.metric,
        units=args.units,
        remove=None if args.remove is None else parse_budget(args.remove),
        keep_first=args.keep_first,
        keep_last=args.keep_last,
        replace=args.replace,
    )
    plan = make_plan(load_scores(args.scores), config)
    if args.dry_run:
        print(format_plan(plan))
        return
    write_plan(plan, args.output, force=args.force)
    units = [e["unit"] for e in plan["remove"]]
    print(f"plan: remove {', '.join(units)} (lowest {config.metric}); wrote {args.output}")


@command("convert-llama2c")
def _convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-llama2c", help="import a llama2.c checkpoint and tokenizer as a Hugging Face Llama")
    p.add_argument("checkpoint", help="llama2.c model file (e.g. stories260K.bin)")
    p.add_argument("tokenizer", help="llama2.c tokenizer file (e.g. tok512.bin)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from depthprune.llama2c import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.output, force=args.force)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depthprune",
        description="Score, remove and repair whole layers of decoder LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"depthprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (2 for bad input, with one line on stderr)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except DepthPruneError as exc:
        message = " ".join(str(exc).split())
        print(f"depthprune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthprune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
