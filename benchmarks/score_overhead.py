"""Time and memory of scoring every static metric of every unit, against a plain forward.

Builds a random Llama of about 100M parameters and runs, over the same tokens and in
the same process, alternating to cancel drift:

- ``plain``: ``model(ids)``, the usual forward with full logits;
- ``plain_last``: ``model(ids, logits_to_keep=1)``, the same without the full LM head,
  which is the fairest baseline since scoring needs no logits;
- ``score``: ``depthprune.score`` with cosine, angular, rel_l1, rel_l2 on all block,
  attn and mlp units in one pass.

Peak memory above the loaded model is measured in a fresh subprocess per mode (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``).

Prints one JSON line. Usage: ``python benchmarks/score_overhead.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

METRICS = ("cosine", "angular", "rel_l1", "rel_l2")


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def data(args: argparse.Namespace):  # noqa: ANN201
    from depthprune.data import pack

    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, args.vocab, (args.batch * args.seq_len,), generator=g).tolist()
    return pack(stream, args.batch, args.seq_len)


def step(mode: str, model: torch.nn.Module, batches) -> None:  # noqa: ANN001
    from depthprune.score import ScoreConfig, score

    with torch.no_grad():
        if mode == "plain":
            model(batches.input_ids, attention_mask=batches.attention_mask, use_cache=False)
        elif mode == "plain_last":
            model(batches.input_ids, attention_mask=batches.attention_mask, use_cache=False, logits_to_keep=1)
        else:
            score(model, batches, ScoreConfig(metrics=METRICS, batch_size=len(batches), show_progress=False))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child(mode: str, args: argparse.Namespace) -> None:
    model, batches = build(args), data(args)
    step("plain_last", model, data(argparse.Namespace(**{**vars(args), "batch": 1, "seq_len": 8})))  # warm up
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step(mode, model, batches)
    print(json.dumps({"peak_above_model_bytes": _status("VmHWM") - base}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return

    model, batches = build(args), data(args)
    modes = ("plain", "plain_last", "score")
    step("score", model, batches)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            t0 = time.perf_counter()
            step(mode, model, batches)
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}

    memory = {}
    argv = [a for a in sys.argv[1:]]
    for mode in modes:
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--memory-child", mode], check=True, capture_output=True, text=True
        ).stdout
        memory[mode] = json.loads(out.strip().splitlines()[-1])["peak_above_model_bytes"]

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
