"""Shared pieces of the speed/memory benchmarks: the models (a random ~110M Llama or a
GGUF file such as the shared SmolLM2-135M), random tokens, alternating timings of wall and
process CPU time, and peak memory measured in fresh subprocesses.

Benchmarks print their figures as one JSON line and write files only into temporary
folders (or where ``--out`` says), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2 = SHARED / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM = "random"


def add_model_args(p: argparse.ArgumentParser, batch: int, threads: int | None = None) -> None:
    """The model (random Llama, ``smollm2`` or a ``.gguf`` path), the token batch and torch's threads."""
    p.add_argument(
        "--model",
        default=RANDOM,
        help=f"'{RANDOM}' (a seeded random Llama sized by --hidden/--layers/--vocab), "
        f"'smollm2' (the shared {SMOLLM2.name}), or a path to a .gguf file",
    )
    p.add_argument("--hidden", type=int, default=768, help="random Llama only")
    p.add_argument("--layers", type=int, default=12, help="random Llama only")
    p.add_argument("--vocab", type=int, default=16000, help="random Llama only; a loaded model uses its own")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=batch, help="sequences")
    p.add_argument("--threads", type=int, default=threads, help=f"torch threads (default: {threads or 'torch chooses'})")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)


def gguf_path(name: str) -> Path | None:
    """The GGUF file ``--model`` names: ``smollm2`` is the shared SmolLM2; ``None`` for ``random``."""
    if name == RANDOM:
        return None
    path = SMOLLM2 if name.lower() == "smollm2" else Path(name).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise SystemExit(f"--model {name!r}: expected '{RANDOM}', 'smollm2' or an existing .gguf file (looked for {path})")
    return path


def load_gguf(path: Path, tokenizer: bool = True) -> tuple[torch.nn.Module, Any]:
    """A GGUF model dequantized to float32, in eval mode, and its tokenizer (if asked).

    Loaded through transformers directly until ``depthprune.loading.load_model`` reads
    GGUF files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the dequantization bar would fill the benchmark's output
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if tokenizer else None
    return model, tok


def build(args: argparse.Namespace) -> torch.nn.Module:
    """The model ``args.model`` names; a random Llama (about 110M parameters at the
    defaults) is seeded. Sets ``args.vocab`` to the model's vocabulary."""
    if args.threads:
        torch.set_num_threads(args.threads)
    path = gguf_path(getattr(args, "model", RANDOM))
    if path is not None:
        model, _ = load_gguf(path, tokenizer=False)
        args.vocab = model.config.vocab_size
        return model

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


def model_label(args: argparse.Namespace, model: torch.nn.Module) -> str:
    path = gguf_path(getattr(args, "model", RANDOM))
    if path is None:
        return f"random Llama {args.layers}x{args.hidden}"
    return f"{path.name} ({model.config.num_hidden_layers} layers, float32)"


def data(args: argparse.Namespace):  # noqa: ANN201
    """``args.batch`` random sequences of ``args.seq_len`` tokens, as TokenBatches."""
    from depthprune.data import pack

    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, args.vocab, (args.batch * args.seq_len,), generator=g).tolist()
    return pack(stream, args.batch, args.seq_len)


def alternate(arms: Sequence[str], run: Callable[[str], None], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Run every arm once per repeat and time it: ``{arm: {"wall": [...], "cpu": [...]}}``.

    The order flips every other repeat (AB BA AB ...), so a load that drifts during the
    run weighs on every arm alike. ``cpu`` is this process's CPU time
    (``time.process_time``, all threads): other processes do not add to it, so a wall
    time well above ``cpu / threads`` shows a loaded machine.
    """
    times: dict[str, dict[str, list[float]]] = {a: {"wall": [], "cpu": []} for a in arms}
    for r in range(repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            run(arm)
            times[arm]["cpu"].append(time.process_time() - cpu)
            times[arm]["wall"].append(time.perf_counter() - wall)
    return times


def median_times(modes: Sequence[str], run: Callable[[str], None], repeats: int) -> dict[str, float]:
    """Median wall seconds of each mode, the modes alternating (see :func:`alternate`)."""
    return {m: statistics.median(t["wall"]) for m, t in alternate(modes, run, repeats).items()}


def spread(values: Sequence[float], digits: int = 4) -> dict[str, float]:
    """Median, best (min) and worst (max) of some seconds or ratios."""
    return {k: round(f(values), digits) for k, f in (("median", statistics.median), ("min", min), ("max", max))}


def load_average() -> float:
    """The 1-minute load average (runnable processes), to show how shared the machine was."""
    return round(os.getloadavg()[0], 2)


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
