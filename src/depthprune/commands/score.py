"""``depthprune score``: how much each unit matters, written to scores.json."""

from __future__ import annotations

import argparse

from depthprune.commands import (
    add_model_args,
    add_output_args,
    add_stream_args,
    load_config_from,
    streamed_from,
)


def register(sub: argparse._SubParsersAction) -> None:
    from depthprune.data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
    from depthprune.score import DEFAULT_METRICS, METRICS
    from depthprune.score.shapley import ESTIMATORS
    from depthprune.score.values import VALUES

    p = sub.add_parser(
        "score",
        help="score every block, attention and MLP unit by static and leave-one-out metrics",
        description="Higher scores mean more important, for every metric. Available metrics: " + ", ".join(METRICS),
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help="calibration text: .txt, .jsonl, a folder of them, or a dataset name[:config][@split]")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl records and datasets")
    p.add_argument("--units", default="block,attn,mlp", help="unit kinds to score (default: block,attn,mlp)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"comma-separated metrics (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N", help=f"calibration sequences (default: {DEFAULT_SAMPLES})")
    p.add_argument(
        "--seq-len", type=int, default=DEFAULT_SEQ_LEN, metavar="T", help=f"tokens per sequence, capped by the model's context (default: {DEFAULT_SEQ_LEN})"
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--last-token", action="store_true", help="static metrics use only each sequence's last token")
    p.add_argument("--span", type=int, default=1, metavar="N", help="blocks per span for angular_span (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="chooses the calibration windows (default: 0)")
    p.add_argument("--plot", metavar="PNG", help="also write a metric x unit heatmap")
    g = p.add_argument_group("shapley", "settings of the `shapley` metric (see also `depthprune shapley`)")
    g.add_argument("--estimator", default="permutation", help=f"{', '.join(ESTIMATORS)} (default: permutation)")
    g.add_argument("--value", default="loss", help=f"value function: {', '.join(VALUES)} (default: loss)")
    g.add_argument("--mmlu", metavar="DIR", help="MMLU data folder, for --value mmlu")
    g.add_argument("--budget", type=int, help="most layer-evaluations per game")
    g.add_argument("--tol", type=float, help="stop once every standard error is below this")
    g.add_argument("--checkpoint", help="save progress to this file (default: none)")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    add_stream_args(p, "static metrics, loo_loss, loo_kl and shapley with --value loss or kl")
    add_output_args(p, "scores.json to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rich.console import Console

    from depthprune._fs import check_output, check_target
    from depthprune.data import context_length, load_calibration
    from depthprune.distributed import is_writer
    from depthprune.loading import load_model
    from depthprune.report import plot_heatmap, scores_table
    from depthprune.score import ScoreConfig, score, write_scores
    from depthprune.score.shapley import ShapleyConfig
    from depthprune.score.values import ValueConfig

    config = ScoreConfig(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        units=tuple(u.strip() for u in args.units.split(",") if u.strip()),
        last_token_only=args.last_token,
        span=args.span,
        batch_size=args.batch_size,
        seed=args.seed,
        show_progress=not args.quiet,
        shapley=ShapleyConfig(
            estimator=args.estimator, budget=args.budget, tol=args.tol, seed=args.seed, batch_size=args.batch_size
        ),
        value=ValueConfig(args.value, mmlu=args.mmlu),
        checkpoint=args.checkpoint,
        resume=args.resume,
    )
    sources = {"models": [args.model], "inputs": [args.data]}
    check_output(args.output, args.force, "file", **sources)
    if args.plot:
        check_output(args.plot, args.force, "file", **sources)
    if args.checkpoint:
        check_target(args.checkpoint, "file", **sources)
    if args.stream:
        from depthprune.loading import load_tokenizer_for
        from depthprune.streamed import check_stream_metrics, score_streamed

        check_stream_metrics(config)
        streamed = streamed_from(args)
        model, tokenizer = streamed.model, load_tokenizer_for(args.model, Path(streamed.ckpt.source), args.trust_remote_code)
    else:
        loaded = load_model(load_config_from(args))
        model, tokenizer = loaded.model, loaded.tokenizer
    data = load_calibration(
        args.data,
        tokenizer,
        n_sequences=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        max_context=context_length(model),
        text_field=args.text_field,
    )
    if args.stream:
        result = score_streamed(streamed, data, config, model_name=args.model)
    else:
        result = score(loaded.model, data, config, spec=loaded.spec, model_name=args.model, tokenizer=loaded.tokenizer)
    write_scores(result, args.output, force=args.force)
    doc = result.to_dict()
    if args.plot and is_writer():
        plot_heatmap(doc, args.plot)
    if not args.quiet:
        Console(stderr=False).print(scores_table(doc))
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
