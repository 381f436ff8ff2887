"""``depthprune demo``: the whole pipeline on a model the package trains itself, offline."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train (or reuse) the testbed model and run the whole pipeline on it, offline",
        description="Needs no files and no network: trains an 8-layer Llama on generated stories "
        "(cached after the first run), then scores, plans, prunes, recovers, evaluates, sweeps and "
        "writes report.html.",
    )
    p.add_argument("-o", "--output", default="depthprune-demo", help="run folder (default: ./depthprune-demo)")
    p.set_defaults(func=run)


def demo_recipe(model_dir: str) -> dict:
    """The demo's recipe for a testbed model folder."""
    return {
        "model": model_dir,
        "data": {"source": f"{model_dir}/calibration.txt", "samples": 16, "seq_len": 128, "seed": 0},
        "tasks": [f"ppl:{model_dir}/eval.txt,seq_len=128,strip=true"],
        "recover": "bias",
        "score": {"metrics": ["cosine", "angular", "rel_l1", "rel_l2", "loo_loss", "loo_kl"], "units": ["block", "attn", "mlp"]},
        "plan": {"metric": "loo_loss", "units": "block", "remove": 2, "keep_first": 1, "keep_last": 0},
        "sweep": {"metrics": ["cosine", "rel_l2", "loo_loss"], "units": "block", "max_remove": 4},
    }


def run(args: argparse.Namespace) -> None:
    import yaml

    from depthprune._fs import check_target, make_dir, write_text_atomic
    from depthprune.commands.run import execute
    from depthprune.recipe import recipe_from_dict
    from depthprune.testbed import TestbedConfig, build_testbed, testbed_dir

    # Before minutes of training: the run folder can be made, and is not the model's.
    check_target(args.output, "dir", models=[testbed_dir(TestbedConfig())])
    if not args.quiet:
        print("[testbed] training or reusing the cached model", flush=True)
    model_dir = build_testbed(show_progress=not args.quiet)
    data = demo_recipe(str(model_dir))
    recipe = recipe_from_dict(data)
    out = make_dir(args.output, models=[model_dir])
    write_text_atomic(out / "recipe.yaml", yaml.safe_dump(data, sort_keys=False))

    execute(recipe, str(out), args.quiet)
