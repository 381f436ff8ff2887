"""Accuracy of sampled Shapley values against their cost, on stories260K's 10 sublayers.

stories260K (5 layers) is converted from ``../shared/models/stories260K`` into a
temporary folder; its 10 sublayers (``attn.i``, ``mlp.i``) are the players and the value
is the negative calibration loss. Exact Shapley values (all 1024 coalitions) are the
ground truth. Against the layer-evaluations spent (layers run x sequences) it measures
the Spearman correlation with the exact values of:

- ``permutation_cached``: the default permutation estimator (cyclic rounds of antithetic
  pairs, stratified by position) with prefix caching, after every round;
- ``permutation_no_cache``: the same samples with every evaluation running all layers;
  the values are checked to be identical, so the two curves differ only in cost;
- ``permutation_independent``: independent antithetic pairs (no stratification), cached;
- ``local``: the paper's local estimator (``k = 2`` units removed per sample), cached;
- ``leave_one_out``: the library's leave-one-out loss (with its own prefix reuse).

Each sampled curve is averaged over ``--seeds`` seeds. Targets: mean Spearman >= 0.95 at
no more than 1/8 of the layer-evaluations exact enumeration needs, and caching cutting
layer-evaluations by >= 1.8x at equal accuracy. Exact enumeration is counted two ways:
as this library runs it (lexicographic order with prefix caching) and without caching
(every coalition runs all layers); the summary reports the target against both.

Writes the curves as JSON and PNG (``--out PREFIX``, default ``./shapley_efficiency``)
and prints one JSON line. Usage: ``python benchmarks/shapley_efficiency.py [--seeds 10]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    """Spearman's rank correlation; NaN when an estimate is not yet defined."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def curve(game_factory: Any, config: Any, exact: np.ndarray, seeds: int) -> tuple[list[dict[str, Any]], list[list[list[float]]]]:
    """Mean/min Spearman and mean cost after each round, over seeds; also every run's estimates."""
    from dataclasses import replace

    from depthprune.score.shapley import estimate_shapley

    rows: dict[int, list[tuple[float, int, int]]] = {}
    estimates: list[list[list[float]]] = []
    for seed in range(seeds):
        seen: list[list[float]] = []

        def record(info: Any) -> None:
            rows.setdefault(info.round, []).append((spearman(info.values, exact), info.layer_evals, info.samples))
            seen.append(list(info.values))

        estimate_shapley(game_factory(), replace(config, seed=seed), on_round=record, show_progress=False)
        estimates.append(seen)
    out = []
    for r in sorted(rows):
        sp, cost, samples = zip(*rows[r])
        if len(sp) < seeds or not np.isfinite(sp).all():
            continue  # some run stopped, or some unit has no estimate yet (local: never absent)
        out.append(
            {
                "round": r,
                "samples": int(np.mean(samples)),
                "layer_evals": float(np.mean(cost)),
                "spearman_mean": float(np.mean(sp)),
                "spearman_min": float(np.min(sp)),
            }
        )
    return out, estimates


def first_reaching(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((p for p in points if p["spearman_mean"] >= target), None)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = doc["exact"]["layer_evals"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {
        "permutation_cached": ("C0", "o-", "permutation, cyclic rounds, cached"),
        "permutation_no_cache": ("C1", "s--", "the same without caching"),
        "permutation_independent": ("C2", "^-", "permutation, independent pairs, cached"),
        "local": ("C4", "v-", "local (k=2), cached"),
    }
    for name, (color, style, label) in styles.items():
        pts = doc["curves"][name]
        x = [p["layer_evals"] / exact for p in pts]
        ax.plot(x, [p["spearman_mean"] for p in pts], style, color=color, label=label, ms=4)
        ax.fill_between(x, [p["spearman_min"] for p in pts], [p["spearman_mean"] for p in pts], color=color, alpha=0.12)
    loo = doc["curves"]["leave_one_out"]
    ax.plot([loo["layer_evals"] / exact], [loo["spearman"]], "k*", ms=11, label="leave-one-out")
    ax.axhline(0.95, color="gray", lw=0.8, ls=":")
    ax.axvline(1 / 8, color="gray", lw=0.8, ls=":")
    ax.axvline(doc["exact"]["layer_evals_no_cache"] / exact / 8, color="gray", lw=0.8, ls="-.")
    ax.set_xscale("log")
    ax.set_xlabel("layer-evaluations / exact enumeration's (cached); dotted: 1/8, dash-dot: 1/8 of uncached exact")
    ax.set_ylabel(f"Spearman vs exact (mean over {doc['seeds']} seeds; band: min)")
    ax.set_title("stories260K, 10 sublayers, loss value")
    ax.set_ylim(min(0.0, loo["spearman"] - 0.05), 1.01)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="shapley_efficiency", help="output prefix: writes PREFIX.json and PREFIX.png")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences (default: 8)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    p.add_argument("--seeds", type=int, default=10, help="repetitions of every sampled curve (default: 10)")
    p.add_argument("--rounds", type=int, default=8, help="cyclic rounds per permutation run (default: 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; costs are counted, not timed)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from depthprune.data import load_calibration
    from depthprune.llama2c import convert_llama2c
    from depthprune.loading import load_model
    from depthprune.score.adaptive import leave_one_out
    from depthprune.score.shapley import ModelGame, ShapleyConfig, estimate_shapley
    from depthprune.score.values import make_value
    from depthprune.units import ModelLayout, all_units

    src = SHARED / "models" / "stories260K"
    with tempfile.TemporaryDirectory() as tmp:
        folder = convert_llama2c(src / "stories260K.bin", src / "tok512.bin", Path(tmp) / "stories260K")
        lm = load_model(str(folder))
    data = load_calibration(
        SHARED / "data" / "tinystories" / "tinystories_sample.txt", lm.tokenizer, n_sequences=args.samples, seq_len=args.seq_len
    )
    layout = ModelLayout(lm.model, lm.spec)
    units = all_units(layout.n_layers, ("attn", "mlp"))
    value = make_value("loss", data)
    n = len(units)

    def game(cache: bool = True) -> ModelGame:
        return ModelGame(layout, value, units, batch_size=args.samples, cache=cache)

    exact_result = estimate_shapley(game(), ShapleyConfig(estimator="exact", round_size=1 << n), show_progress=False)
    exact = np.array([exact_result.values[u] for u in exact_result.players])
    plain = game(cache=False)
    exact_no_cache = plain.cost(plain.order(range(1 << n)))

    perm = ShapleyConfig(max_samples=args.rounds * n)
    cached, cached_est = curve(game, perm, exact, args.seeds)
    no_cache, no_cache_est = curve(lambda: game(cache=False), ShapleyConfig(max_samples=args.rounds * n, cache=False), exact, args.seeds)
    diff = max(abs(a - b) for x, y in zip(cached_est, no_cache_est) for u, v in zip(x, y) for a, b in zip(u, v))
    if diff > 1e-9:
        raise SystemExit(f"caching changed the estimates by {diff}; the comparison would not be at equal accuracy")
    independent, _ = curve(game, ShapleyConfig(design="independent", round_size=2, max_samples=4 * args.rounds), exact, args.seeds)
    local, _ = curve(game, ShapleyConfig(estimator="local", local_k=2, round_size=8, max_samples=16 * args.rounds), exact, args.seeds)

    loo_stats, loo_cost = leave_one_out(layout, data, units, ["loo_loss"], batch_size=args.samples, show_progress=False)
    loo = [loo_stats[("loo_loss", u)].mean for u in units]
    loo_curve = {"layer_evals": loo_cost, "spearman": spearman(loo, exact), "values": dict(zip(map(str, units), loo))}

    ratios = [b["layer_evals"] / a["layer_evals"] for a, b in zip(cached, no_cache)]
    reach = first_reaching(cached, 0.95)
    cost_exact = exact_result.layer_evals
    at_eighth = [p for p in cached if p["layer_evals"] <= cost_exact / 8]
    at_eighth_no_cache = [p for p in cached if p["layer_evals"] <= exact_no_cache / 8]
    summary = {
        "benchmark": "shapley_efficiency",
        "model": "stories260K",
        "players": n,
        "calibration": f"{data.info.n_sequences}x{data.info.seq_len} tokens",
        "seeds": args.seeds,
        "exact_layer_evals": cost_exact,
        "exact_layer_evals_no_cache": exact_no_cache,
        "permutation_first_round": cached[0],
        "permutation_reaches_0.95": None
        if reach is None
        else {**reach, "fraction_of_exact": reach["layer_evals"] / cost_exact, "fraction_of_exact_no_cache": reach["layer_evals"] / exact_no_cache},
        "best_spearman_within_1/8_exact": max((p["spearman_mean"] for p in at_eighth), default=None),
        "best_spearman_within_1/8_exact_no_cache": max((p["spearman_mean"] for p in at_eighth_no_cache), default=None),
        "cache_max_value_difference": diff,
        "cache_ratio_min": min(ratios),
        "cache_ratio_mean": float(np.mean(ratios)),
        "cache_ratio_at_0.95": None if reach is None else ratios[cached.index(reach)],
        "leave_one_out": {"layer_evals": loo_cost, "spearman": loo_curve["spearman"]},
        "target_spearman_at_1/8_exact": bool(reach is not None and reach["layer_evals"] <= cost_exact / 8),
        "target_spearman_at_1/8_exact_no_cache": bool(reach is not None and reach["layer_evals"] <= exact_no_cache / 8),
        "target_cache_ratio_1.8": bool(min(ratios) >= 1.8),
    }
    doc = {
        "summary": summary,
        "seeds": args.seeds,
        "players": [str(u) for u in units],
        "calibration": data.info.to_dict(),
        "exact": {
            "values": exact_result.values,
            "layer_evals": cost_exact,
            "layer_evals_no_cache": exact_no_cache,
            "v_full": exact_result.v_full,
            "v_empty": exact_result.v_empty,
        },
        "curves": {
            "permutation_cached": cached,
            "permutation_no_cache": no_cache,
            "permutation_independent": independent,
            "local": local,
            "leave_one_out": loo_curve,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, Path(f"{out}.png"))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
