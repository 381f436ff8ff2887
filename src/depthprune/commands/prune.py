"""``depthprune prune``: remove units (optionally emulating them) and export the model."""

from __future__ import annotations

import argparse

from depthprune.commands import (
    add_model_args,
    add_output_args,
    add_stream_args,
    load_config_from,
    stream_config_from,
)


def register(sub: argparse._SubParsersAction) -> None:
    from depthprune.data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
    from depthprune.recover.emulate import DEFAULT_RIDGE
    from depthprune.recover.select import DEFAULT_HELDOUT

    p = sub.add_parser(
        "prune",
        help="remove units, optionally emulate them, and export the model",
        description="Only whole blocks, nothing emulated: a standard checkpoint of the same architecture. "
        "Sublayers or emulators: a depthprune_<family> checkpoint that loads after `import depthprune` "
        "(or a nemotron-nas config for vLLM with --format nemotron-nas, or one .gguf file for llama.cpp with "
        "--format gguf; neither takes emulators).",
    )
    add_model_args(p)
    p.add_argument("--remove", help="comma-separated units to remove, e.g. block.3,attn.5")
    p.add_argument("--plan", help="a plan.json from `depthprune plan` (or written by hand); instead of --remove")
    p.add_argument(
        "--recover",
        metavar="none|bias|lowrank:R|linear:R|linear:full",
        help="replace every removed unit by this emulation, fitted in closed form on --data (overrides the plan); "
        "bias and linear:R fold into the kept weights where exact",
    )
    p.add_argument(
        "--no-fold",
        dest="fold",
        action="store_false",
        help="keep every emulator a module (a depthprune_<family> export) instead of folding it into the weights",
    )
    p.add_argument(
        "--heldout",
        type=float,
        default=DEFAULT_HELDOUT,
        metavar="F",
        help="fraction of the calibration sequences (the last ones) held out to check each emulator against plain "
        f"removal; 0 keeps every emulator unchecked (default: {DEFAULT_HELDOUT})",
    )
    p.add_argument("--data", help="calibration text for fitting emulators (as for `depthprune score --data`)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl records and datasets")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N", help=f"calibration sequences (default: {DEFAULT_SAMPLES})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, metavar="T", help=f"tokens per sequence (default: {DEFAULT_SEQ_LEN})")
    p.add_argument("--seed", type=int, default=0, help="chooses the calibration windows (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass when fitting (default: 8)")
    p.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help=f"relative ridge of low-rank fits (default: {DEFAULT_RIDGE})")
    p.add_argument("--format", default="hf", choices=["hf", "nemotron-nas", "gguf"], help="export format (default: hf)")
    p.add_argument(
        "--gguf-type",
        metavar="f32|f16|bf16",
        help="type of the weight matrices in a --format gguf export (default: f32; norms stay f32)",
    )
    p.add_argument(
        "--in-memory",
        action="store_true",
        help="load the model to prune it even when its safetensors shards could be rewritten on disk "
        "(the default for --format hf when nothing is emulated; both write the same tensors)",
    )
    add_stream_args(p)
    add_output_args(p, "output folder (a .gguf file with --format gguf)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed and write nothing")
    p.set_defaults(func=_run_prune)


def _run_prune(args: argparse.Namespace) -> None:
    from depthprune.api import PruneConfig, prune_model

    prune = PruneConfig(
        out=args.output,
        remove=args.remove,
        plan=args.plan,
        recover=args.recover,
        data=args.data,
        n_samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        text_field=args.text_field,
        ridge=args.ridge,
        batch_size=args.batch_size,
        fold=args.fold,
        heldout=args.heldout,
        export_format=args.format,
        gguf_type=args.gguf_type,
        force=args.force,
        dry_run=args.dry_run,
        rewrite_shards=not args.in_memory,
        show_progress=not args.quiet,
        stream=stream_config_from(args) if args.stream else None,
    )
    result = prune_model(load_config_from(args), prune)
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {', '.join(map(str, result.removed))}: {result.n_layers_before} -> {result.n_layers_after} layers, "
        f"{result.params_before:,} -> {result.params_after:,} parameters"
        + ("" if args.dry_run else f"; wrote {args.output}")
    )
