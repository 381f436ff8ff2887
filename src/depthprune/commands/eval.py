"""``depthprune eval``: perplexity, MMLU and lm-eval tasks on a saved model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from depthprune.commands import (
    add_model_args,
    add_stream_args,
    load_config_from,
    streamed_from,
)

SPEC_HELP = (
    "a task spec KIND:TARGET[,key=value...]; repeat for several. "
    "ppl:FILE[,seq_len=T][,stride=S][,max_tokens=N][,bos=auto|none|stream|window][,documents=join|separate]; "
    "mmlu:DIR[,limit=N][,shots=K][,subjects=a+b]; "
    "hellaswag:FILE_OR_DIR[,limit=N][,skip=N]; "
    "lm_eval:TASK[,include_path=DIR][,limit=N][,shots=K]"
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    p = sub.add_parser(
        "eval",
        help="evaluate a model: perplexity, MMLU (paper's 5-shot protocol), any lm-eval task",
        description="Evaluate a saved model on task specs and print a table; --json writes every number and its protocol.",
    )
    add_model_args(p)
    p.add_argument("--task", "-t", action="append", required=True, metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--json", metavar="OUT", help="write the results, with each task's protocol, to this JSON file")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.add_argument("--batch-size", type=int, metavar="B", help="batch size of every task whose spec does not set one")
    p.add_argument("--mask", metavar="UNITS", help="evaluate with these units masked, e.g. block.3,attn.5")
    add_stream_args(p)
    # No --quiet here: a subcommand default would overwrite the global -q/--quiet, which
    # may also be written after the subcommand (see depthprune.cli.GLOBAL_FLAGS).
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Parse every spec, load the model, evaluate, print a table, write --json."""
    import contextlib

    from depthprune._fs import check_output, write_json_atomic
    from depthprune.errors import InputError
    from depthprune.evaluate import evaluate, parse_task
    from depthprune.loading import load_model
    from depthprune.units import mask_units, parse_units

    load = load_config_from(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    defaults: dict[str, Any] = {"show_progress": not args.quiet}
    if args.batch_size is not None:
        defaults["batch_size"] = args.batch_size
    specs = [parse_task(t, defaults) for t in args.task]  # fail on a typo before loading anything
    if args.json:
        targets = [t.partition(":")[2].split(",")[0] for t in args.task]  # data files; a task name is no path
        check_output(args.json, args.force, "file", models=[args.model], inputs=targets)
    if args.stream:
        _run_streamed(args, specs)
        return
    loaded = load_model(load)
    if loaded.tokenizer is None:
        raise InputError(f"{args.model!r} has no tokenizer; every evaluation task needs one")
    masked = parse_units(args.mask, loaded.n_layers) if args.mask else []
    guard = mask_units(loaded.model, masked, loaded.spec) if masked else contextlib.nullcontext()
    with guard:
        result = evaluate(loaded.model, loaded.tokenizer, specs, show_progress=not args.quiet, model_name=args.model)
    result["masked"] = [str(u) for u in masked]
    result["dtype"] = load.dtype
    print_table(result)
    if args.json:
        write_json_atomic(args.json, result, force=args.force)
        print(f"wrote {args.json}")


def _run_streamed(args: argparse.Namespace, specs: list[Any]) -> None:
    """``eval --stream``: perplexity tasks, layer by layer from the checkpoint."""
    import datetime as _dt
    import time
    from pathlib import Path

    from depthprune import __version__
    from depthprune._fs import write_json_atomic
    from depthprune.errors import InputError
    from depthprune.loading import load_tokenizer_for
    from depthprune.streamed import perplexity_streamed
    from depthprune.units import parse_units

    other = [s.text for s in specs if s.kind != "ppl"]
    if other:
        raise InputError(f"--stream evaluates perplexity (ppl:) tasks only; run {other[0]!r} without --stream")
    streamed = streamed_from(args)
    tokenizer = load_tokenizer_for(args.model, Path(streamed.ckpt.source), args.trust_remote_code)
    if tokenizer is None:
        raise InputError(f"{args.model!r} has no tokenizer; every evaluation task needs one")
    masked = parse_units(args.mask, streamed.n_layers) if args.mask else []
    results: dict[str, Any] = {}
    for spec in specs:
        start = time.perf_counter()
        r = perplexity_streamed(streamed, tokenizer, spec.target, spec.config, masked)
        results[spec.text] = {**r, "spec": spec.text, "seconds": round(time.perf_counter() - start, 3)}
    result = {
        "model": args.model,
        "tasks": results,
        "meta": {"version": __version__, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")},
        "masked": [str(u) for u in masked],
        "dtype": args.dtype,
        "execution": "layer-streamed",
    }
    print_table(result)
    if args.json:
        write_json_atomic(args.json, result, force=args.force)
        print(f"wrote {args.json}")


def _row(spec: str, r: dict[str, Any]) -> tuple[str, str, str, str, str]:
    from depthprune.evaluate import task_score

    value = f"{task_score(r):.4f}"
    if r["task"] == "ppl":
        p = r["protocol"]
        return spec, "ppl", value, f"{r['n_scored']:,} tok", f"{p['mode']} T={p['seq_len']} S={p['stride']}"
    if r["task"] == "mmlu":
        return spec, "acc", value, f"{r['n']:,} q", f"macro {r['macro_accuracy']:.4f}, {r['protocol']['shots']}-shot"
    if r["task"] == "hellaswag":
        return spec, "acc_norm", value, f"{r['n']:,} items", f"acc {r['acc']:.4f}, 0-shot"
    n = sum(v.get("effective", 0) for v in r.get("n_samples", {}).values() if isinstance(v, dict))
    return spec, r["metric"], value, f"{n:,} docs", ", ".join(r["tasks"])


def print_table(result: dict[str, Any]) -> None:
    """Print one row per task: spec, metric, value, size, protocol summary."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.get('model')}" + (f" (masked: {', '.join(result['masked'])})" if result.get("masked") else ""))
    table.add_column("task", overflow="fold", ratio=3)
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    table.add_column("protocol", ratio=2)
    table.add_column("s", justify="right", no_wrap=True)
    for spec, r in result["tasks"].items():
        table.add_row(*_row(_short(spec), r), f"{r['seconds']:.1f}")
    Console().print(table)


def _short(spec: str) -> str:
    """``ppl:/long/path/wiki.test.raw,seq_len=512`` -> ``ppl:wiki.test.raw,seq_len=512``."""
    kind, _, rest = spec.partition(":")
    target, sep, options = rest.partition(",")
    return f"{kind}:{Path(target).name or target}{sep}{options}"
