"""Shared pieces of the speed/memory benchmarks: a random ~100M Llama, random tokens,
alternating timings, and peak memory measured in fresh subprocesses."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def add_model_args(p: argparse.ArgumentParser, batch: int) -> None:
    """Size of the random Llama and of the token batch."""
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=batch, help="sequences")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)


def build(args: argparse.Namespace) -> torch.nn.Module:
    """A randomly initialised Llama (about 110M parameters at the defaults), seeded."""
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
    """``args.batch`` random sequences of ``args.seq_len`` tokens, as TokenBatches."""
    from depthprune.data import pack

    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, args.vocab, (args.batch * args.seq_len,), generator=g).tolist()
    return pack(stream, args.batch, args.seq_len)


def median_times(modes: Sequence[str], run: Callable[[str], None], repeats: int) -> dict[str, float]:
    """Median seconds of each mode, the modes alternating in every repeat to cancel drift."""
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            t0 = time.perf_counter()
            run(mode)
            times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child(run: Callable[[], None], warm_up: Callable[[], None]) -> None:
    """In a fresh process: peak resident memory of ``run()`` above what was resident before
    it (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``)."""
    warm_up()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    run()
    print(json.dumps({"peak_above_model_bytes": _status("VmHWM") - base}))


def peak_memory(script: str, modes: Sequence[str]) -> dict[str, int]:
    """Run ``script --memory-child MODE`` for every mode and collect the peaks."""
    memory = {}
    for mode in modes:
        out = subprocess.run(
            [sys.executable, script, *sys.argv[1:], "--memory-child", mode], check=True, capture_output=True, text=True
        ).stdout
        memory[mode] = json.loads(out.strip().splitlines()[-1])["peak_above_model_bytes"]
    return memory
