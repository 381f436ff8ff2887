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
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed and write nothing")
    p.set_defaults(func=_run_prune)


def _run_prune(args: argparse.Namespace) -> None:
    from depthprune.api import prune_model

    result = prune_model(
        args.model,
        remove=args.remove,
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
