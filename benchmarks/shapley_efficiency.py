"""Accuracy of sampled Shapley values against their cost: stories260K (10 players) and SmolLM2 (60).

Part 1, stories260K (always). Its 10 sublayers (``attn.i``, ``mlp.i``) are the players,
the value is the negative calibration loss, and exact Shapley values (all 1,024
coalitions) are the ground truth. The baseline is exact enumeration as the library runs
it: lexicographic order over layer mask patterns, with the prefix cache, in its default
chunks. Against its layer-evaluations (layers run x sequences) and its wall time, the
benchmark measures the Spearman correlation with the exact values, after every round and
over ``--seeds`` seeds (mean and worst seed), of:

- ``permutation_cyclic``: the default estimator (cyclic rounds of antithetic pairs), cached;
- ``permutation_cyclic_no_cache``: the same samples without the cache (values checked to
  be identical, so the two differ only in cost);
- ``permutation_independent``: independent antithetic pairs, cached;
- ``local``: the paper's local estimator (``k = 2``), cached;
- ``leave_one_out``: the library's leave-one-out loss.

It also counts the distinct (layer, prefix) states that cached exact enumeration touches
(its cost: each once) and that one cyclic round touches, which is why 1/8 of cached
exact's cost cannot reach Spearman 0.95 on 10 players.

Part 2, SmolLM2-135M (``--smollm2``): its 60 sublayers, on a few short sequences. Exact
enumeration is infeasible (2^60 coalitions; its cached cost is computed, not run). The
reference is a permutation run of ``2 x --smollm2-pairs`` independent antithetic pairs,
drawn as two independent halves A and B: each half's curve is scored against the other
half (an independent reference), and the agreement of the halves gives the reference's
own reliability. Leave-one-out and local sampling are scored against the pooled halves.
The cost of one round of the default cyclic design is computed, and the rounds run only
with ``--smollm2-cyclic-rounds``.

Writes JSON and PNG figures to ``--out`` (default: a new temporary folder, never the
repository) and prints one JSON line. Usage:
``python benchmarks/shapley_efficiency.py [--seeds 10] [--smollm2 [--smollm2-pairs 6]]``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SMOLLM2 = SHARED / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = SHARED / "data" / "tinystories" / "tinystories_sample.txt"


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation; NaN when an estimate is not yet defined."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def bottom_overlap(a: Any, b: Any, k: int) -> float:
    """Share of the k least important players of ``a`` that are among ``b``'s k least."""
    return len(set(np.argsort(a)[:k]) & set(np.argsort(b)[:k])) / k


def run_recorded(game: Any, config: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Run the estimator; record estimates, cost and wall time after every round."""
    from depthprune.score.shapley import estimate_shapley

    points: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def record(info: Any) -> None:
        points.append(
            {"round": info.round, "samples": info.samples, "layer_evals": info.layer_evals,
             "wall_s": time.perf_counter() - t0, "values": list(info.values)}
        )

    result = estimate_shapley(game, config, on_round=record, show_progress=False)
    return result, points


def curve(game_factory: Any, config: Any, truth: np.ndarray, seeds: int) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """Spearman with ``truth`` after each round, mean and worst over seeds, with costs."""
    runs = [run_recorded(game_factory(), replace(config, seed=seed))[1] for seed in range(seeds)]
    out = []
    for r in range(min(len(points) for points in runs)):
        rows = [points[r] for points in runs]
        sp = [spearman(p["values"], truth) for p in rows]
        if not np.isfinite(sp).all():
            continue  # some player has no estimate yet
        out.append(
            {
                "round": r + 1,
                "samples": int(np.mean([p["samples"] for p in rows])),
                "layer_evals": float(np.mean([p["layer_evals"] for p in rows])),
                "wall_s": float(np.mean([p["wall_s"] for p in rows])),
                "spearman_mean": float(np.mean(sp)),
                "spearman_min": float(np.min(sp)),
            }
        )
    return out, runs


def best_within(points: list[dict[str, Any]], limit: float) -> dict[str, Any] | None:
    """The last point (most samples) that costs at most ``limit`` layer-evaluations."""
    inside = [p for p in points if p["layer_evals"] <= limit]
    return inside[-1] if inside else None


def first_reaching(points: list[dict[str, Any]], target: float, key: str) -> dict[str, Any] | None:
    return next((p for p in points if p[key] >= target), None)


# --------------------------------------------------------------------------- part 1: stories260K


def stories(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from depthprune.data import load_calibration
    from depthprune.llama2c import convert_llama2c
    from depthprune.loading import load_model
    from depthprune.score.adaptive import leave_one_out
    from depthprune.score.shapley import (
        ModelGame,
        ShapleyConfig,
        estimate_shapley,
        get_estimator,
    )
    from depthprune.score.values import make_value
    from depthprune.units import ModelLayout, all_units

    src = SHARED / "models" / "stories260K"
    with tempfile.TemporaryDirectory() as tmp:
        folder = convert_llama2c(src / "stories260K.bin", src / "tok512.bin", Path(tmp) / "stories260K")
        lm = load_model(str(folder))
    data = load_calibration(TEXT, lm.tokenizer, n_sequences=args.samples, seq_len=args.seq_len)
    layout = ModelLayout(lm.model, lm.spec)
    units = all_units(layout.n_layers, ("attn", "mlp"))
    value = make_value("loss", data)
    n = len(units)

    def game(cache: bool = True) -> ModelGame:
        return ModelGame(layout, value, units, batch_size=args.samples, cache=cache)

    # The headline baseline: exact enumeration as the library runs it (default settings).
    t0 = time.perf_counter()
    exact_result = estimate_shapley(game(), ShapleyConfig(estimator="exact"), show_progress=False)
    exact_wall = time.perf_counter() - t0
    exact = np.array([exact_result.values[u] for u in units])
    t0 = time.perf_counter()
    plain = estimate_shapley(game(cache=False), ShapleyConfig(estimator="exact", cache=False), show_progress=False)
    exact_no_cache_wall = time.perf_counter() - t0
    cost_exact = exact_result.layer_evals
    probe = game()
    states_exact = probe.distinct_states(range(1 << n)) * args.samples
    cyclic = get_estimator("permutation").build(probe, ShapleyConfig())
    sigma = cyclic.draw(cyclic.new_state(), np.random.default_rng(0), n)[0]
    one_round = probe.order(set(cyclic.coalitions(sigma)) | {0, probe.full})

    perm = ShapleyConfig(max_samples=args.rounds * n)
    cached, cached_runs = curve(game, perm, exact, args.seeds)
    no_cache, no_cache_runs = curve(lambda: game(cache=False), replace(perm, cache=False), exact, args.seeds)
    diff = max(
        abs(a - b) for x, y in zip(cached_runs, no_cache_runs) for p, q in zip(x, y) for a, b in zip(p["values"], q["values"])
    )
    if diff > 1e-9:
        raise SystemExit(f"caching changed the estimates by {diff}; the comparison would not be at equal accuracy")
    independent, _ = curve(game, ShapleyConfig(design="independent", round_size=2, max_samples=4 * args.rounds), exact, args.seeds)
    local, _ = curve(game, ShapleyConfig(estimator="local", local_k=2, round_size=8, max_samples=16 * args.rounds), exact, args.seeds)

    t0 = time.perf_counter()
    loo_stats, loo_cost = leave_one_out(layout, data, units, ["loo_loss"], batch_size=args.samples, show_progress=False)
    loo_wall = time.perf_counter() - t0
    loo = [loo_stats[("loo_loss", u)].mean for u in units]
    loo_point = {"layer_evals": loo_cost, "wall_s": loo_wall, "spearman": spearman(loo, exact)}

    curves = {
        "permutation_cyclic": cached,
        "permutation_cyclic_no_cache": no_cache,
        "permutation_independent": independent,
        "local": local,
    }
    eighth = {name: best_within(points, cost_exact / 8) for name, points in curves.items()}
    reach = first_reaching(cached, 0.95, "spearman_mean")
    reach_worst = first_reaching(cached, 0.95, "spearman_min")
    ratios = [b["layer_evals"] / a["layer_evals"] for a, b in zip(cached, no_cache)]

    def frac(p: dict[str, Any] | None) -> dict[str, Any] | None:
        if p is None:
            return None
        return {**p, "fraction_of_exact": p["layer_evals"] / cost_exact, "fraction_of_exact_wall": p["wall_s"] / exact_wall}

    summary = {
        "model": "stories260K",
        "players": n,
        "calibration": f"{data.info.n_sequences}x{data.info.seq_len} tokens",
        "seeds": args.seeds,
        "exact": {"layer_evals": cost_exact, "wall_s": round(exact_wall, 2), "evaluations": exact_result.evaluations,
                  "distinct_layer_prefix_states": states_exact},
        "exact_no_cache": {"layer_evals": plain.layer_evals, "wall_s": round(exact_no_cache_wall, 2)},
        "one_cyclic_round": {"coalitions": len(one_round), "layer_evals": probe.cost(one_round),
                             "distinct_layer_prefix_states": probe.distinct_states(one_round) * args.samples,
                             "fraction_of_exact": probe.cost(one_round) / cost_exact},
        "at_1/8_exact": {name: frac(p) for name, p in eighth.items()},
        "cyclic_first_mean_0.95": frac(reach),
        "cyclic_first_worst_seed_0.95": frac(reach_worst),
        "cache_ratio_min": min(ratios),
        "cache_ratio_mean": float(np.mean(ratios)),
        "cache_max_value_difference": diff,
        "leave_one_out": {**loo_point, "fraction_of_exact": loo_cost / cost_exact},
        "target_spearman_0.95_at_1/8_exact": bool(reach is not None and reach["layer_evals"] <= cost_exact / 8),
    }
    doc = {"summary": summary, "players": [str(u) for u in units], "exact_values": exact.tolist(),
           "curves": curves, "leave_one_out": {**loo_point, "values": loo}}
    (out / "stories260K.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot_stories(doc, cost_exact, exact_wall, out / "stories260K.png")
    return summary


def plot_stories(doc: dict[str, Any], cost: float, wall: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "permutation_cyclic": ("C0", "o-", "permutation, cyclic rounds, cached"),
        "permutation_cyclic_no_cache": ("C1", "s--", "the same without caching"),
        "permutation_independent": ("C2", "^-", "permutation, independent pairs, cached"),
        "local": ("C4", "v-", "local (k=2), cached"),
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, base, label in ((axes[0], "layer_evals", cost, "layer-evaluations"), (axes[1], "wall_s", wall, "wall time")):
        for name, (color, style, text) in styles.items():
            pts = doc["curves"][name]
            x = [p[key] / base for p in pts]
            ax.plot(x, [p["spearman_mean"] for p in pts], style, color=color, label=text, ms=4)
            ax.fill_between(x, [p["spearman_min"] for p in pts], [p["spearman_mean"] for p in pts], color=color, alpha=0.12)
        loo = doc["leave_one_out"]
        ax.plot([loo[key] / base], [loo["spearman"]], "k*", ms=11, label="leave-one-out")
        ax.axhline(0.95, color="gray", lw=0.8, ls=":")
        ax.axvline(1 / 8, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} / cached exact enumeration's (dotted: 1/8)")
    axes[0].set_ylabel("Spearman vs exact (mean; band: worst seed)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("stories260K, 10 sublayers, loss value")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- part 2: SmolLM2


def smollm2(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from depthprune.data import load_calibration
    from depthprune.score.adaptive import leave_one_out
    from depthprune.score.shapley import ModelGame, ShapleyConfig, get_estimator
    from depthprune.score.values import make_value
    from depthprune.units import ModelLayout, all_units

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    load_s = time.perf_counter() - t0
    seqs = args.smollm2_samples
    data = load_calibration(TEXT, tokenizer, n_sequences=seqs, seq_len=args.smollm2_seq_len)
    layout = ModelLayout.of(model)
    units = all_units(layout.n_layers, ("attn", "mlp"))
    value = make_value("loss", data)
    n, n_layers = len(units), layout.n_layers

    def game() -> ModelGame:
        return ModelGame(layout, value, units, batch_size=seqs)

    # Exact: 4^(j+1) distinct mask patterns of layers 0..j, each run once in lexicographic order.
    exact_cost = sum(4 ** (j + 1) for j in range(n_layers)) * seqs
    probe = game()
    cyclic = get_estimator("permutation").build(probe, ShapleyConfig())
    sigma = cyclic.draw(cyclic.new_state(), np.random.default_rng(0), n)[0]
    round_coalitions = probe.order(set(cyclic.coalitions(sigma)) | {0, probe.full})
    cyclic_round_cost = probe.cost(round_coalitions)

    t0 = time.perf_counter()
    loo_stats, loo_cost = leave_one_out(layout, data, units, ["loo_loss"], batch_size=seqs, show_progress=False)
    loo_wall = time.perf_counter() - t0
    loo = np.array([loo_stats[("loo_loss", u)].mean for u in units])

    halves = []
    for seed in (0, 1):
        config = ShapleyConfig(design="independent", round_size=1, max_samples=args.smollm2_pairs, seed=seed, batch_size=seqs)
        halves.append(run_recorded(game(), config))
    (res_a, pts_a), (res_b, pts_b) = halves
    final = [np.array(pts[-1]["values"]) for pts in (pts_a, pts_b)]
    reference = (final[0] + final[1]) / 2  # equal numbers of pairs: the pooled mean
    split_half = spearman(final[0], final[1])
    throughput = (res_a.layer_evals + res_b.layer_evals) / (pts_a[-1]["wall_s"] + pts_b[-1]["wall_s"])
    ks = (max(1, n // 10), max(1, n // 5))

    def score(values: Any, against: np.ndarray) -> dict[str, float]:
        return {"spearman": spearman(values, against), **{f"bottom_{k}_overlap": bottom_overlap(values, against, k) for k in ks}}

    pairs_curve = []
    for i in range(min(len(pts_a), len(pts_b))):
        rows = [score(pts_a[i]["values"], final[1]), score(pts_b[i]["values"], final[0])]
        pairs_curve.append(
            {"pairs": i + 1, "layer_evals": (pts_a[i]["layer_evals"] + pts_b[i]["layer_evals"]) / 2,
             "wall_s": (pts_a[i]["wall_s"] + pts_b[i]["wall_s"]) / 2,
             **{f"{k}_mean": float(np.mean([r[k] for r in rows])) for k in rows[0]},
             "spearman_min": min(r["spearman"] for r in rows)}
        )
    local_cfg = ShapleyConfig(estimator="local", local_k=n // 4, round_size=16, max_samples=args.smollm2_local, seed=2, batch_size=seqs)
    local_res, local_pts = run_recorded(game(), local_cfg)
    local_curve = [{"samples": p["samples"], "layer_evals": p["layer_evals"], "wall_s": p["wall_s"], **score(p["values"], reference)}
                   for p in local_pts if np.isfinite(p["values"]).all()]
    cyclic_curve = []
    if args.smollm2_cyclic_rounds:
        _, cyc_pts = run_recorded(game(), ShapleyConfig(max_samples=args.smollm2_cyclic_rounds * n, seed=3, batch_size=seqs))
        cyclic_curve = [{"samples": p["samples"], "layer_evals": p["layer_evals"], "wall_s": p["wall_s"], **score(p["values"], reference)}
                        for p in cyc_pts]

    # Spearman-Brown: the reliability of one pair from that of a half of k pairs, and the
    # pairs whose pooled estimate would reach reliability 0.9 (correlation ~0.95 with the truth).
    k = res_a.samples
    per_pair = split_half / (k - (k - 1) * split_half) if split_half > 0 else float("nan")
    need = math.ceil(0.9 * (1 - per_pair) / (per_pair * 0.1)) if split_half > 0 else None
    pair_cost = (res_a.layer_evals + res_b.layer_evals) / (res_a.samples + res_b.samples)
    summary = {
        "model": "SmolLM2-135M-Instruct (Q4_1 gguf, float32)",
        "players": n,
        "calibration": f"{data.info.n_sequences}x{data.info.seq_len} tokens",
        "load_s": round(load_s, 1),
        "throughput_layer_evals_per_s": round(throughput, 1),
        "exact": {"coalitions": 2**n, "layer_evals_cached": exact_cost,
                  "years_at_this_throughput": exact_cost / throughput / 3.15e7},
        "one_cyclic_round": {"coalitions": len(round_coalitions), "layer_evals": cyclic_round_cost,
                             "minutes_at_this_throughput": cyclic_round_cost / throughput / 60},
        "reference": {"design": "independent antithetic pairs", "pairs": res_a.samples + res_b.samples,
                      "layer_evals": res_a.layer_evals + res_b.layer_evals,
                      "split_half_spearman": split_half,
                      "reliability_spearman_brown": 2 * split_half / (1 + split_half),
                      "pairs_for_reliability_0.9": need,
                      "layer_evals_for_reliability_0.9": None if need is None else need * pair_cost,
                      "hours_for_reliability_0.9": None if need is None else need * pair_cost / throughput / 3600,
                      "median_stderr": float(np.median([(res_a.stderr[u] ** 2 + res_b.stderr[u] ** 2) ** 0.5 / 2 for u in units])),
                      "value_range": [float(reference.min()), float(reference.max())], "v_full": res_a.v_full, "v_empty": res_a.v_empty},
        "pairs_vs_other_half": pairs_curve,
        "leave_one_out_vs_reference": {"layer_evals": loo_cost, "wall_s": loo_wall, **score(loo, reference)},
        "local_vs_reference": local_curve[-1] if local_curve else None,
    }
    if cyclic_curve:
        summary["cyclic_vs_reference"] = cyclic_curve
    doc = {"summary": summary, "players": [str(u) for u in units], "reference": reference.tolist(), "loo": loo.tolist(),
           "half_a": final[0].tolist(), "half_b": final[1].tolist(), "local_curve": local_curve}
    (out / "smollm2.json").write_text(json.dumps(doc, indent=2) + "\n")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for the JSON and PNG figures (default: a new temporary folder)")
    p.add_argument("--samples", type=int, default=8, help="stories260K calibration sequences (default: 8)")
    p.add_argument("--seq-len", type=int, default=64, help="stories260K tokens per sequence (default: 64)")
    p.add_argument("--seeds", type=int, default=10, help="repetitions of every stories260K curve (default: 10)")
    p.add_argument("--rounds", type=int, default=8, help="cyclic rounds per stories260K permutation run (default: 8)")
    p.add_argument("--smollm2", action="store_true", help="also run part 2 on SmolLM2-135M's 60 sublayers")
    p.add_argument("--only-smollm2", action="store_true", help="run part 2 only")
    p.add_argument("--smollm2-samples", type=int, default=2, help="SmolLM2 calibration sequences (default: 2)")
    p.add_argument("--smollm2-seq-len", type=int, default=32, help="SmolLM2 tokens per sequence (default: 32)")
    p.add_argument("--smollm2-pairs", type=int, default=6, help="antithetic pairs in each reference half (default: 6)")
    p.add_argument("--smollm2-local", type=int, default=64, help="coalitions of the local estimator (default: 64)")
    p.add_argument("--smollm2-cyclic-rounds", type=int, default=0, help="cyclic rounds to run (default: 0, cost only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="shapley_efficiency_"))
    out.mkdir(parents=True, exist_ok=True)
    line: dict[str, Any] = {"benchmark": "shapley_efficiency", "out": str(out)}
    if not args.only_smollm2:
        line["stories260K"] = stories(args, out)
    if args.smollm2 or args.only_smollm2:
        line["smollm2"] = smollm2(args, out)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
