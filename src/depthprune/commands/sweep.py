"""``depthprune sweep``: task score against units removed, one curve per (unit kind, metric)."""

from __future__ import annotations

import argparse


def split_task_list(text: str, kinds: list[str]) -> list[str]:
    """Split ``ppl:a,seq_len=128,mmlu:b`` into task specs.

    A comma starts a new spec only where the next piece begins with a task kind and a
    colon; otherwise it separates that spec's ``key=value`` options.
    """
    specs: list[str] = []
    for piece in text.split(","):
        starts_spec = piece.strip().partition(":")[0] in kinds and ":" in piece
        if starts_spec or not specs:
            specs.append(piece.strip())
        else:
            specs[-1] += "," + piece.strip()
    return [s for s in specs if s]


def register(sub: argparse._SubParsersAction) -> None:
    from depthprune.commands import add_model_args, add_stream_args

    p = sub.add_parser(
        "sweep",
        help="evaluate tasks with 0..K units of each kind removed in each metric's order (the paper's main figure)",
        description="Units are masked, not removed, so one loaded model serves every point. With several "
        "--units, each kind is swept on its own curves (attention vs MLP vs block removal). sweep.json is "
        "rewritten after every point; rerunning the same command resumes. With --stream (perplexity tasks "
        "only), every point is a branch of one layer-streamed pass per task, each layer read once, and "
        "sweep.json is written when the pass ends.",
    )
    add_model_args(p)
    add_stream_args(p, "ppl: tasks, every point in one pass per task")
    p.add_argument("--scores", required=True, help="scores.json from `depthprune score` or `depthprune shapley`")
    p.add_argument("--metrics", required=True, help="comma-separated metrics of scores.json, e.g. cosine,rel_l2,loo_loss,shapley")
    p.add_argument(
        "--units",
        default="block",
        metavar="KINDS",
        help="comma-separated unit kinds, each removed on its own curves: block, attn, mlp (default: block)",
    )
    p.add_argument(
        "--max-remove",
        required=True,
        metavar="K|F",
        help="per kind, remove 0..K units (a count >= 1) or 0..F of the kind's units (a fraction in (0, 1), e.g. 0.33)",
    )
    p.add_argument(
        "--tasks",
        action="append",
        required=True,
        help="task specs, comma-separated or repeated: ppl:FILE[,seq_len=T],mmlu:DIR[,limit=N],hellaswag:FILE,lm_eval:TASK",
    )
    p.add_argument("--batch-size", type=int, help="batch size of every task whose spec does not set one")
    p.add_argument("-o", "--output", required=True, help="folder for sweep.json and one PNG per task")
    p.add_argument("--force", action="store_true", help="start over instead of resuming an existing sweep.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import functools
    from pathlib import Path
    from typing import Any

    from torch import nn

    from depthprune._fs import check_target, os_errors
    from depthprune.commands import load_config_from, streamed_from
    from depthprune.distributed import is_writer
    from depthprune.errors import InputError
    from depthprune.evaluate import TASKS, evaluate, parse_task, task_score
    from depthprune.loading import load_model, load_tokenizer_for
    from depthprune.scores_file import load_scores
    from depthprune.streamed import check_stream_tasks, evaluate_points_streamed
    from depthprune.sweep import SweepConfig, plot_sweep, sweep
    from depthprune.units import Unit

    tasks = [t for group in args.tasks for t in split_task_list(group, list(TASKS))]
    for t in tasks:
        parse_task(t)  # fail on a typo before loading anything
    config = SweepConfig(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        units=args.units,
        max_remove=args.max_remove,
        tasks=tuple(tasks),
        show_progress=not args.quiet,
    )
    if args.stream:
        defaults = {"show_progress": False, **({"batch_size": args.batch_size} if args.batch_size is not None else {})}
        check_stream_tasks([parse_task(t, defaults) for t in tasks])  # before loading anything
    check_target(args.output, "dir", models=[args.model])
    scores = load_scores(args.scores)

    def headline(res: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {k: {"score": task_score(v), "higher_is_better": v.get("higher_is_better")} for k, v in res.items()}

    if args.stream:
        streamed = streamed_from(args)
        model = streamed.model
        tokenizer = load_tokenizer_for(args.model, Path(streamed.ckpt.source), args.trust_remote_code)
        if tokenizer is None:
            raise InputError(f"{args.model!r} has no tokenizer; every evaluation task needs one")
        specs = [parse_task(t, defaults) for t in tasks]

        def evaluate_points(points: list[list[str]]) -> list[dict[str, dict[str, Any]]]:
            masks = [[Unit.parse(u, streamed.n_layers) for u in removed] for removed in points]
            return [headline(r) for r in evaluate_points_streamed(streamed, tokenizer, specs, masks)]

        run_sweep = functools.partial(sweep, model, scores, config, evaluate_points=evaluate_points)
    else:
        loaded = load_model(load_config_from(args))

        def evaluator(model: nn.Module) -> dict[str, dict[str, Any]]:
            return headline(evaluate(model, loaded.tokenizer, tasks, batch_size=args.batch_size, show_progress=False)["tasks"])

        run_sweep = functools.partial(sweep, loaded.model, scores, config, evaluator)

    if args.force and (Path(args.output) / "sweep.json").exists():
        with os_errors(args.output):
            (Path(args.output) / "sweep.json").unlink()
    result = run_sweep(out_dir=args.output, model_name=args.model)
    pngs = plot_sweep(result, args.output, tasks) if is_writer() else []
    for kind, metric in result.lines():
        for task in tasks:
            curve = ", ".join(f"{v:.4g}" for v in result.curve(kind, metric, task))
            print(f"{kind:>5} {metric:>12}  {task}: {curve}")
    print(f"wrote {Path(args.output) / 'sweep.json'} and {len(pngs)} plot(s)")
