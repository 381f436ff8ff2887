"""Time and memory of scoring every static metric of every unit, against the same forward without hooks.

Runs, over the same tokens and in the same process, alternating (AB BA ...) to cancel drift:

- ``forward``: ``model(ids, logits_to_keep=1)``, the forward pass that scoring runs,
  without its hooks (scoring needs no logits, so neither arm computes the full LM head);
- ``score``: ``depthprune.score`` with cosine, angular, rel_l1, rel_l2 on all block,
  attn and mlp units in one pass.

The headline is ``ratio``: the median ``score`` wall time over the median ``forward`` wall
time (target <= 1.05). Beside it: the ratio of each repeat's adjacent pair (median and
worst), the same from process CPU time (which other processes on a shared machine do not
inflate), whether each meets the target, and the load average. Peak memory above the
loaded model is measured in a fresh subprocess per arm. Torch runs one thread unless
``--threads`` says otherwise (see ``main``).

Models: a seeded random Llama of about 110M parameters (default), or ``--model smollm2``
(the shared SmolLM2-135M GGUF, dequantized to float32) or ``--model PATH.gguf``.

Prints one JSON line and writes no files. Usage:
``python benchmarks/score_overhead.py [--model smollm2] [--batch 2] [--repeats 5] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _common import (
    add_model_args,
    alternate,
    build,
    data,
    load_average,
    memory_child,
    model_label,
    peak_memory,
    spread,
)

METRICS = ("cosine", "angular", "rel_l1", "rel_l2")
ARMS = ("forward", "score")
TARGET = 1.05


def step(arm: str, model: torch.nn.Module, batches) -> None:  # noqa: ANN001
    from depthprune.score import ScoreConfig, score

    with torch.no_grad():
        if arm == "forward":
            model(batches.input_ids, attention_mask=batches.attention_mask, use_cache=False, logits_to_keep=1)
        else:
            score(model, batches, ScoreConfig(metrics=METRICS, batch_size=len(batches), show_progress=False))


def ratios(times: dict[str, dict[str, list[float]]], clock: str) -> dict[str, float]:
    """``score`` over ``forward``: of the medians, and of each repeat's pair (median, worst)."""
    s, f = times["score"][clock], times["forward"][clock]
    paired = [a / b for a, b in zip(s, f)]
    return {
        "of_medians": round(statistics.median(s) / statistics.median(f), 4),
        "paired_median": round(statistics.median(paired), 4),
        "paired_worst": round(max(paired), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One thread by default: on an oversubscribed machine a preempted OpenMP thread stalls
    # its team at every barrier, which inflates the arm with more small ops (the hooks'
    # reductions) far beyond its work: 2 threads at load ~10 on 2 cores read 1.5-1.8x
    # where 1 thread reads ~1.02x in CPU time.
    add_model_args(p, batch=4, threads=1)
    p.add_argument("--repeats", type=int, default=5, help="alternating runs of each arm")
    p.add_argument("--skip-memory", action="store_true", help="do not measure peak memory (saves two model loads)")
    args = p.parse_args()
    model = build(args)
    batches = data(args)
    if args.memory_child:
        tiny = data(argparse.Namespace(**{**vars(args), "batch": 1, "seq_len": 8}))
        memory_child(lambda: step(args.memory_child, model, batches), lambda: step("forward", model, tiny))
        return

    load_before = load_average()
    step("score", model, batches)  # warm-up: allocator, hooks' first call
    times = alternate(ARMS, lambda arm: step(arm, model, batches), args.repeats)
    load_after = load_average()
    wall, cpu = ratios(times, "wall"), ratios(times, "cpu")
    figures = {
        "benchmark": "score_overhead",
        "model": model_label(args, model),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": batches.info.n_tokens,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ratio": wall["of_medians"],
        "target": f"ratio <= {TARGET}",
        "target_met": {"wall": wall["of_medians"] <= TARGET, "cpu": cpu["of_medians"] <= TARGET},
        "ratio_wall": wall,
        "ratio_cpu": cpu,
        "wall_s": {arm: spread(t["wall"]) for arm, t in times.items()},
        "cpu_s": {arm: spread(t["cpu"]) for arm, t in times.items()},
        "load_average_1min": [load_before, load_after],
    }
    if not args.skip_memory:
        memory = peak_memory(__file__, ARMS)
        figures["peak_mem_above_model_bytes"] = memory
        figures["mem_ratio"] = round(memory["score"] / max(memory["forward"], 1), 4)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
