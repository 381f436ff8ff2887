"""Time and memory of scoring every static metric of every unit, against a plain forward.

Builds a random Llama of about 110M parameters and runs, over the same tokens and in
the same process, alternating to cancel drift:

- ``plain``: ``model(ids)``, the usual forward with full logits;
- ``plain_last``: ``model(ids, logits_to_keep=1)``, the same without the full LM head,
  which is the fairest baseline since scoring needs no logits;
- ``score``: ``depthprune.score`` with cosine, angular, rel_l1, rel_l2 on all block,
  attn and mlp units in one pass.

Peak memory above the loaded model is measured in a fresh subprocess per mode.
Prints one JSON line. Usage: ``python benchmarks/score_overhead.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json

import torch
from _common import add_model_args, build, data, median_times, memory_child, peak_memory

METRICS = ("cosine", "angular", "rel_l1", "rel_l2")
MODES = ("plain", "plain_last", "score")


def step(mode: str, model: torch.nn.Module, batches) -> None:  # noqa: ANN001
    from depthprune.score import ScoreConfig, score

    with torch.no_grad():
        if mode == "plain":
            model(batches.input_ids, attention_mask=batches.attention_mask, use_cache=False)
        elif mode == "plain_last":
            model(batches.input_ids, attention_mask=batches.attention_mask, use_cache=False, logits_to_keep=1)
        else:
            score(model, batches, ScoreConfig(metrics=METRICS, batch_size=len(batches), show_progress=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, batch=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    model, batches = build(args), data(args)
    if args.memory_child:
        tiny = data(argparse.Namespace(**{**vars(args), "batch": 1, "seq_len": 8}))
        memory_child(lambda: step(args.memory_child, model, batches), lambda: step("plain_last", model, tiny))
        return

    step("score", model, batches)  # warm-up
    med = median_times(MODES, lambda mode: step(mode, model, batches), args.repeats)
    memory = peak_memory(__file__, MODES)
    print(
        json.dumps(
            {
                "benchmark": "score_overhead",
                "params": sum(p.numel() for p in model.parameters()),
                "tokens": batches.info.n_tokens,
                "threads": torch.get_num_threads(),
                "median_s": med,
                "ratio_score_vs_plain": med["score"] / med["plain"],
                "ratio_score_vs_plain_last": med["score"] / med["plain_last"],
                "peak_mem_above_model_bytes": memory,
                "mem_ratio_score_vs_plain": memory["score"] / max(memory["plain"], 1),
                "target": "ratio_score_vs_plain <= 1.10",
            }
        )
    )


if __name__ == "__main__":
    main()
