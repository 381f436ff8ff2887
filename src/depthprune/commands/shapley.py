"""``depthprune shapley`` (Shapley values to scores.json) and ``depthprune iterative`` (plan.json)."""

from __future__ import annotations

import argparse
from typing import Any

from depthprune.commands import (
    add_model_args,
    add_output_args,
    add_stream_args,
    load_config_from,
)


def _add_common(p: argparse.ArgumentParser) -> None:
    """Flags shared by both commands: data, units, value and estimator."""
    from depthprune.data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
    from depthprune.score.shapley import DESIGNS, ESTIMATORS
    from depthprune.score.values import TASK_METRICS, VALUES

    add_model_args(p)
    p.add_argument("--data", help="calibration text for the loss and kl values: .txt, .jsonl, a folder, or a dataset name")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl records and datasets")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N", help=f"calibration sequences (default: {DEFAULT_SAMPLES})")
    p.add_argument(
        "--seq-len", type=int, default=DEFAULT_SEQ_LEN, metavar="T",
        help=f"tokens per sequence, capped by the model's context (default: {DEFAULT_SEQ_LEN})",
    )
    p.add_argument("--value", default="loss", help=f"what a coalition is worth: {', '.join(VALUES)} (default: loss)")
    p.add_argument("--mmlu", metavar="PATH", help="MMLU folder (dev/ and test/ CSVs) for --value mmlu")
    p.add_argument("--mmlu-split", default="test", help="MMLU split whose questions are scored (default: test)")
    p.add_argument("--subjects", help="comma-separated MMLU subjects (default: all)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N MMLU questions per subject")
    p.add_argument("--shots", type=int, default=5, help="solved dev questions before each MMLU question (default: 5)")
    p.add_argument("--task-metric", default="loss", help=f"mmlu value: {' or '.join(TASK_METRICS)} (0/1) (default: loss)")
    p.add_argument("--estimator", default="permutation", help=f"Shapley estimator: {', '.join(ESTIMATORS)} (default: permutation)")
    p.add_argument("--design", default="cyclic", help=f"permutation design: {', '.join(DESIGNS)} (default: cyclic, stratified by position)")
    p.add_argument("--budget", type=int, metavar="N", help="stop before N layer-evaluations (layers x sequences) per game")
    p.add_argument("--tol", type=float, metavar="X", help="stop once every unit's standard error is below X")
    p.add_argument("--max-samples", type=int, metavar="N", help="most permutation pairs (or local coalitions) per game")
    p.add_argument("--local-k", type=int, metavar="K", help="units removed per coalition of --estimator local (default: n/4)")
    p.add_argument("--seed", type=int, default=0, help="chooses the calibration windows and seeds the sampling (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--no-cache", action="store_true", help="run every layer of every evaluation (to measure the cache's saving)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    p.add_argument("--checkpoint", metavar="PATH", help="progress file (default: the output path + .ckpt)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shapley",
        help="Shapley values of blocks or sublayers (exact, permutation or local sampling) to scores.json",
        description="Higher values mean more important. Blocks play one game, attention and MLP sublayers another. "
        "Progress is saved after every round; --resume continues an interrupted run with identical results. "
        "With --stream (values loss and kl), each round's coalitions are branches of one layer-streamed pass: "
        "each layer is read once per round; --budget then counts the layer-evaluations that pass runs.",
    )
    _add_common(p)
    add_stream_args(p, "--value loss or kl, one pass per round of coalitions")
    p.add_argument("--units", default="block", help="unit kinds: block, attn, mlp or attn,mlp (default: block)")
    add_output_args(p, "scores.json to write")
    p.set_defaults(func=run_shapley)

    q = sub.add_parser(
        "iterative",
        help="remove units one at a time, re-scoring the rest (Shapley or SLEB-style greedy), to plan.json",
        description="Each step masks the units removed so far and scores the remaining ones again.",
    )
    _add_common(q)
    q.add_argument("--units", default="block", help="unit kinds: block, attn, mlp or attn,mlp (default: block)")
    q.add_argument("--method", default="shapley", help="shapley (re-estimate after each removal) or greedy (SLEB: least value lost) (default: shapley)")
    q.add_argument("--remove", required=True, metavar="K|FRACTION", help="how many units to remove: a count or a fraction")
    add_output_args(q, "plan.json to write")
    q.set_defaults(func=run_iterative)


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Load the model and build the value function; return (loaded, value, data or None).

    With ``args.stream`` (``shapley --stream``), ``loaded`` is a
    :class:`~depthprune.streamed.StreamedModel` (no weights read yet).
    """
    from pathlib import Path

    from depthprune.commands import streamed_from
    from depthprune.data import context_length, load_calibration
    from depthprune.errors import InputError
    from depthprune.loading import load_model, load_tokenizer_for
    from depthprune.score.values import ValueConfig, make_value

    value_config = ValueConfig(
        args.value,
        mmlu=args.mmlu,
        split=args.mmlu_split,
        subjects=_kinds(args.subjects) if args.subjects else None,
        limit=args.limit,
        shots=args.shots,
        task_metric=args.task_metric,
    )
    if args.value in ("loss", "kl") and not args.data:
        raise InputError(f"the {args.value} value needs calibration text; pass --data PATH")
    if getattr(args, "stream", False):
        loaded = streamed_from(args)
        tokenizer = load_tokenizer_for(args.model, Path(loaded.ckpt.source), args.trust_remote_code)
    else:
        loaded = load_model(load_config_from(args))
        tokenizer = loaded.tokenizer
    context = context_length(loaded.model)
    data = None
    if args.data:
        data = load_calibration(
            args.data, tokenizer, n_sequences=args.samples, seq_len=args.seq_len, seed=args.seed,
            max_context=context, text_field=args.text_field,
        )
    return loaded, make_value(value_config, data, tokenizer, context), data


def _check_outputs(args: argparse.Namespace, checkpoint: str) -> None:
    """The output and its checkpoint: not in the model's folder, not over the inputs."""
    from depthprune._fs import check_output, check_target

    sources = {"models": [args.model], "inputs": [args.data, args.mmlu]}
    check_output(args.output, args.force, "file", **sources)
    check_target(checkpoint, "file", **sources)


def _shapley_config(args: argparse.Namespace) -> Any:
    from depthprune.score.shapley import ShapleyConfig

    return ShapleyConfig(
        estimator=args.estimator,
        tol=args.tol,
        budget=args.budget,
        max_samples=args.max_samples,
        local_k=args.local_k,
        design=args.design,
        seed=args.seed,
        batch_size=args.batch_size,
        cache=not args.no_cache,
    )


def run_shapley(args: argparse.Namespace) -> None:
    from depthprune.errors import InputError
    from depthprune.identity import config_sha256
    from depthprune.score import (
        ScoreResult,
        get_metric,
        shapley_definition,
        shapley_tables,
        write_scores,
    )
    from depthprune.score.shapley import estimate_shapley, shapley_units, unit_games
    from depthprune.streamed.games import StreamedGame, check_stream_value
    from depthprune.units import ModelLayout

    config = _shapley_config(args)
    kinds = _kinds(args.units)
    unit_games(1, kinds)  # validates the kinds before loading anything
    if args.stream:
        check_stream_value(args.value)
        if args.no_cache:
            raise InputError("--no-cache has no meaning with --stream (a round is one pass that shares every prefix); drop one")
    checkpoint = args.checkpoint or f"{args.output}.ckpt"
    _check_outputs(args, checkpoint)
    loaded, value, _ = _load(args)
    layout = loaded.layout if args.stream else ModelLayout(loaded.model, loaded.spec)
    games = unit_games(layout.n_layers, kinds)
    results = {}
    for name, players in games.items():
        path = checkpoint if len(games) == 1 else f"{checkpoint}.{name}"
        if args.stream:
            game = StreamedGame(loaded, value, players, batch_size=config.batch_size)
            results[name] = estimate_shapley(game, config, checkpoint=path, resume=args.resume, show_progress=not args.quiet)
        else:
            results[name] = shapley_units(
                layout, value, players, config, checkpoint=path, resume=args.resume, show_progress=not args.quiet
            )
    scores, stderr = shapley_tables(results.values())
    result = ScoreResult(
        model=args.model,
        family=layout.spec.family,
        n_layers=layout.n_layers,
        calibration=value.calibration,
        scores={"shapley": scores},
        stderr={"shapley": stderr},
        definitions={"shapley": shapley_definition(get_metric("shapley"), results)},
        seed=args.seed,
        cost={
            **{f"shapley_{name}_layer_evals": r.layer_evals for name, r in results.items()},
            **({"stream_layer_reads": loaded.layer_reads} if args.stream else {}),
        },
        config_sha256=config_sha256(loaded.model.config),
    )
    write_scores(result, args.output, force=args.force)
    for name, r in results.items():
        print(
            f"{name}: {r.samples} samples, {r.layer_evals:,} layer-evaluations ({r.stopped}); "
            f"least important first: {', '.join(map(str, r.ranking()))}"
        )
    print(f"wrote {args.output}")


def run_iterative(args: argparse.Namespace) -> None:
    from depthprune.plan import parse_budget
    from depthprune.score.iterative import IterativeConfig, iterative_prune, write_plan
    from depthprune.units import ModelLayout, all_units

    config = IterativeConfig(
        method=args.method,
        remove=parse_budget(args.remove),
        shapley=_shapley_config(args),
        batch_size=args.batch_size,
        cache=not args.no_cache,
    )
    kinds = _kinds(args.units)
    all_units(1, kinds)
    _check_outputs(args, args.checkpoint or f"{args.output}.ckpt")
    loaded, value, _ = _load(args)
    layout = ModelLayout(loaded.model, loaded.spec)
    result = iterative_prune(
        layout,
        value,
        all_units(layout.n_layers, kinds),
        config,
        model_name=args.model,
        checkpoint=args.checkpoint or f"{args.output}.ckpt",
        resume=args.resume,
        show_progress=not args.quiet,
    )
    write_plan(result, args.output, force=args.force)
    for k, step in enumerate(result.steps):
        print(f"{k}: remove {step.unit} (score {step.score:.6g}); value {step.value_before:.6g} -> {step.value_after:.6g}")
    print(f"{result.layer_evals:,} layer-evaluations; wrote {args.output}")
