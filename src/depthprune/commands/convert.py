"""``depthprune convert-llama2c``: import a llama2.c model."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
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
