"""``depthprune convert-llama2c`` and ``convert-gguf``: import models from other formats."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-llama2c", help="import a llama2.c checkpoint and tokenizer as a Hugging Face Llama")
    p.add_argument("checkpoint", help="llama2.c model file (e.g. stories260K.bin)")
    p.add_argument("tokenizer", help="llama2.c tokenizer file (e.g. tok512.bin)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_run_convert)

    g = sub.add_parser(
        "convert-gguf",
        help="import a GGUF file (llama.cpp) as a plain Hugging Face safetensors folder",
        description="Dequantize a .gguf model with transformers' GGUF loader and save it as a plain Hugging Face "
        "folder (config.json, model.safetensors, tokenizer). Every command that takes a MODEL also accepts "
        "the .gguf file directly.",
    )
    g.add_argument("gguf", help="the .gguf file")
    g.add_argument("-o", "--output", required=True, help="output folder")
    g.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights (default: float32)"
    )
    g.add_argument("--force", action="store_true", help="replace an existing output folder")
    g.set_defaults(func=_run_convert_gguf)


def _run_convert(args: argparse.Namespace) -> None:
    from depthprune.llama2c import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.output, force=args.force)
    print(f"wrote {out}")


def _run_convert_gguf(args: argparse.Namespace) -> None:
    from depthprune.gguf_import import convert_gguf

    out = convert_gguf(args.gguf, args.output, args.dtype, force=args.force)
    print(f"wrote {out}")
