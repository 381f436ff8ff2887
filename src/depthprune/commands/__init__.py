"""CLI subcommands, one module each.

Every module here defines ``register(sub)``, which adds its subcommand(s) to the
``argparse`` sub-parsers, with ``func`` set to a handler that takes the parsed
arguments. :mod:`depthprune.cli` discovers and imports them all. Handlers raise
:class:`depthprune.errors.DepthPruneError` for bad input; the CLI turns it into one line
on stderr and exit code 2. Global flags every handler can read: ``args.quiet``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from depthprune.loading import LoadConfig
    from depthprune.streamed import StreamConfig, StreamedModel


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The positional model and the loading flags shared by every command that loads one.

    :func:`load_config_from` turns them into a :class:`~depthprune.loading.LoadConfig`.
    """
    p.add_argument("model", help="a local model folder, a .gguf file or a Hugging Face Hub id")
    # The choices are depthprune.loading.DTYPES, spelled out so that --help needs no torch import.
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype; auto keeps the checkpoint's (default: auto)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument(
        "--device-map",
        metavar="auto|balanced|sequential|JSON",
        help="let accelerate place the model across GPUs, CPU and disk instead of --device: a strategy, "
        'or a JSON object (inline or a file) such as {"model.layers.0": 0, "model.layers.1": "cpu", ...}',
    )
    p.add_argument("--offload-folder", help="folder for weights the device map puts on disk")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow code from the model repository to run (off by default)"
    )


def load_config_from(args: argparse.Namespace) -> LoadConfig:
    """The :class:`~depthprune.loading.LoadConfig` of the flags added by :func:`add_model_args`."""
    from depthprune.devices import parse_device_map
    from depthprune.distributed import rank_device
    from depthprune.loading import LoadConfig

    return LoadConfig(
        args.model,
        dtype=args.dtype,
        device=rank_device(args.device),
        trust_remote_code=args.trust_remote_code,
        device_map=parse_device_map(getattr(args, "device_map", None)),
        offload_folder=getattr(args, "offload_folder", None),
    )


def add_output_args(p: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    """``-o/--output`` and ``--force``."""
    p.add_argument("-o", "--output", required=required, help=what)
    p.add_argument("--force", action="store_true", help="replace an existing output")


def add_stream_args(p: argparse.ArgumentParser, covers: str = "") -> None:
    """``--stream``, ``--stream-budget`` and ``--stream-spill-dir``: layer-streamed execution.

    Args:
        p: The command's parser.
        covers: What the command streams (the rest is refused), for ``--stream``'s help.
    """
    g = p.add_argument_group("streaming", "run layer by layer from the safetensors files, for models larger than memory")
    more = f"; streams {covers}, refuses the rest" if covers else ""
    g.add_argument("--stream", action="store_true", help=f"read each decoder layer from disk when it runs, then free it{more}")
    g.add_argument(
        "--stream-budget", metavar="SIZE", help="memory for one layer's weights plus activations, e.g. 2GB; activations beyond it spill to disk (default: no limit)"
    )
    g.add_argument("--stream-spill-dir", metavar="DIR", help="where the temporary spill folder goes (default: the system's temp folder)")


def streamed_from(args: argparse.Namespace) -> StreamedModel:
    """The :class:`~depthprune.streamed.StreamedModel` of the model and stream flags."""
    from depthprune.distributed import rank_device
    from depthprune.streamed import open_streamed

    config = stream_config_from(args)
    device = rank_device(args.device)
    return open_streamed(args.model, config, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)


def stream_config_from(args: argparse.Namespace) -> StreamConfig:
    """The :class:`~depthprune.streamed.StreamConfig` of the stream flags."""
    from depthprune.streamed import StreamConfig, parse_bytes

    budget = parse_bytes(args.stream_budget) if args.stream_budget else None
    return StreamConfig(budget=budget, spill_dir=args.stream_spill_dir)
