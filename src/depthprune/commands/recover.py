"""``depthprune recover-compare``: the recovery figure for a plan or a list of units."""

from __future__ import annotations

import argparse
from pathlib import Path

from depthprune.commands import add_model_args, add_output_args, load_config_from


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``recover-compare`` subcommand."""
    p = sub.add_parser(
        "recover-compare",
        help="held-out loss against units removed for plain removal, closed-form emulation and learned recovery",
    )
    add_model_args(p)
    p.add_argument("--plan", help="plan.json whose remove list, in order, is the ranking (least important first)")
    p.add_argument("--remove", help="the ranking as comma-separated units instead, e.g. block.3,attn.5,block.1")
    p.add_argument("--data", required=True, help="text to fit on and evaluate on: .txt/.jsonl file, folder or dataset")
    p.add_argument("--text-field", default="text", help="field of JSONL records that holds the text (default: text)")
    p.add_argument("--n-fit", type=int, default=64, metavar="N", help="sequences to fit and train on (default: 64)")
    p.add_argument("--n-eval", type=int, default=16, metavar="N", help="held-out sequences to evaluate on (default: 16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="chooses the sequences, the split and the learned runs")
    p.add_argument(
        "--methods", default="none,bias,lowrank:8", help="closed-form methods: none, bias, lowrank:R (default: none,bias,lowrank:8)"
    )
    p.add_argument("--learned", default="", help="learned baselines: bias, lowrank:R, lora:R (default: none)")
    p.add_argument("--counts", help="numbers of units removed to measure, e.g. 1,2,4 (default: 0..all)")
    p.add_argument("--steps", type=int, help="training steps of each learned run (default: 100)")
    p.add_argument("--tokens", type=int, help="training tokens of each learned run, instead of --steps")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the learned baselines (default: 1e-3)")
    p.add_argument("--ridge", type=float, default=None, help="relative ridge of low-rank fits (default: 1e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    add_output_args(p, "the results JSON to write")
    p.add_argument("--plot", help="the PNG figure to write (default: the output's name with .png)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from rich.console import Console

    from depthprune._fs import check_output
    from depthprune.architectures import spec_for_config
    from depthprune.data import context_length, load_calibration
    from depthprune.errors import InputError
    from depthprune.identity import check_made_for
    from depthprune.loading import load_config, load_model
    from depthprune.plan import plan_units, read_plan
    from depthprune.recover.compare import (
        CompareConfig,
        compare_recovery,
        comparison_table,
        split_heldout,
        write_comparison,
    )
    from depthprune.recover.emulate import DEFAULT_RIDGE
    from depthprune.units import parse_unit_list

    if bool(args.plan) == bool(args.remove):
        raise InputError("give the ranking with exactly one of --plan plan.json and --remove u1,u2,...")
    plot = args.plot or str(Path(args.output).with_suffix(".png"))
    sources = {"models": [args.model], "inputs": [args.plan, args.data]}
    check_output(args.output, args.force, "file", **sources)
    check_output(plot, args.force, "file", **sources)
    config = CompareConfig(
        methods=_csv(args.methods),
        learned=_csv(args.learned),
        counts=tuple(int(c) for c in _csv(args.counts)) if args.counts else None,
        ridge=DEFAULT_RIDGE if args.ridge is None else args.ridge,
        steps=args.steps,
        tokens=args.tokens,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        show_progress=not args.quiet,
    )
    model_config, _ = load_config(args.model, args.trust_remote_code)
    spec = spec_for_config(model_config)
    n_layers = getattr(model_config, spec.num_layers_key)
    if args.plan:
        plan = read_plan(args.plan)
        check_made_for(plan, model_config, n_layers, f"plan file {args.plan!r}", args.model, "make the plan from this model's scores")
        units = [u for u, _ in plan_units(plan, n_layers, where=f"plan file {args.plan!r}")]
    else:
        units = parse_unit_list(args.remove, n_layers)  # the ranking keeps the order given
    loaded = load_model(load_config_from(args))
    data = load_calibration(
        args.data,
        loaded.tokenizer,
        n_sequences=args.n_fit + args.n_eval,
        seq_len=args.seq_len,
        seed=args.seed,
        max_context=context_length(loaded.model),
        text_field=args.text_field,
    )
    fit, held = split_heldout(data, args.n_eval, args.seed)
    result = compare_recovery(loaded.model, units, fit, held, config, loaded.spec, model_name=args.model)
    write_comparison(result, args.output, plot, force=args.force)
    Console().print(comparison_table(result))
    print(f"wrote {args.output} and {plot}")
