"""Peak memory and time of scoring SmolLM2 layer-streamed against in memory.

Both arms compute the same scores (static metrics: cosine, angular, rel_l1, rel_l2; and
leave-one-out loss) on the same calibration tokens, each in its own fresh subprocess:

- ``memory``: ``load_model`` then ``depthprune.score.score`` (the whole model resident);
- ``stream``: ``depthprune.streamed.score_streamed`` (a meta-device skeleton; each layer
  read from the memory-mapped safetensors file when it runs, then freed).

The shared SmolLM2-135M GGUF is first converted to a float32 safetensors folder (538 MB of
weights) in a temporary folder, and the calibration text is tokenized once in the parent
and handed to both children as a safetensors file, so that neither child's peak includes
the tokenizer. Each child reports its own peak RSS (``VmHWM``: ``ru_maxrss`` keeps the
parent's peak across ``exec``), its RSS once torch, transformers and depthprune are
imported (the same code in both arms), and the wall and CPU time of its work (load +
score). The parent reports the ratios of the total peaks (the headline, with the targets:
streamed <= 40% of in memory; time <= 1.5x), of the peaks above the imports, and the
largest relative difference between the two arms' scores.

``MALLOC_MMAP_THRESHOLD_`` is set to the same fixed value in both children (see
``--malloc-mmap-threshold``): glibc otherwise raises its threshold after the first large
free, and later freed blocks stay in the heap, which inflates the streamed arm's peak
(which frees each layer) more than the resident one.

With ``--stage fit`` the two arms instead run ``prune --recover``'s closed-form fit of
``--fit-units`` with ``--recover`` (default ``block.2,block.15`` with ``lowrank:32``) and the
held-out keep-or-drop check (``fit_emulators`` + ``select_emulators`` in memory,
``fit_emulators_streamed`` + ``select_emulators_streamed`` streamed), and the parent also
reports the largest difference of the emulators' tensors (relative to each tensor's largest
entry) and both arms' decisions.

Prints one JSON line. Usage:
``python benchmarks/stream_memory.py [--samples 4] [--seq-len 128] [--units block] [--threads 1] [--stage fit]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SMOLLM2, load_average

METRICS = ("cosine", "angular", "rel_l1", "rel_l2", "loo_loss")
DATA = SMOLLM2.parents[2] / "data" / "wikitext-2-raw" / "wiki.test.raw"
RSS_TARGET, TIME_TARGET = 0.40, 1.5


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes. ``VmHWM`` is this process's peak RSS;
    unlike ``ru_maxrss`` it starts afresh at ``exec``, so the parent's size (it holds the
    converted model for a while) does not leak into the children's figures."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM  # noqa: F401

    import depthprune.loading
    import depthprune.streamed  # noqa: F401  (both arms import the same code before the baseline)
    from depthprune.data import CalibrationInfo, TokenBatches
    from depthprune.score import ScoreConfig

    torch.set_num_threads(args.threads)
    base = _status("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    t = load_file(args.tokens)
    info = CalibrationInfo(str(DATA), int(t["ids"].shape[0]), int(t["ids"].shape[1]), int(t["ids"].numel()), "benchmark", 0, False)
    data = TokenBatches(t["ids"], t["mask"], info)
    config = ScoreConfig(metrics=METRICS, units=tuple(args.units.split(",")), batch_size=args.samples, show_progress=False)
    if args.stage == "fit":
        result = _fit_child(args, data)
    elif args.child == "memory":
        from depthprune.loading import load_model
        from depthprune.score import score

        lm = load_model(args.model_dir, load_tokenizer=False)
        result = score(lm.model, data, config)
    else:
        from depthprune.streamed import (
            StreamConfig,
            open_streamed,
            parse_bytes,
            score_streamed,
        )

        budget = parse_bytes(args.stream_budget) if args.stream_budget else None
        result = score_streamed(open_streamed(args.model_dir, StreamConfig(budget=budget)), data, config)
    print(
        json.dumps(
            {
                "peak_rss_bytes": _status("VmHWM"),
                "rss_after_imports_bytes": base,
                "wall_s": round(time.perf_counter() - wall, 2),
                "cpu_s": round(time.process_time() - cpu, 2),
                "scores": result.scores,
                "cost": result.cost,
                **({"decisions": result.decisions} if args.stage == "fit" else {}),
            }
        )
    )


def _fit_child(args: argparse.Namespace, data: object) -> argparse.Namespace:
    """``prune --recover``'s fit and held-out check; the emulators go to ``args.params``."""
    from safetensors.torch import save_file

    from depthprune.recover.emulate import EmulationConfig
    from depthprune.recover.select import split_tail
    from depthprune.units import parse_units

    plan = {u: args.recover for u in parse_units(args.fit_units.split(","))}
    fit, heldout = split_tail(data, args.heldout)  # type: ignore[arg-type]
    config = EmulationConfig(batch_size=args.samples, show_progress=False)
    cost: dict[str, int] = {}
    if args.child == "memory":
        from depthprune.loading import load_model
        from depthprune.recover.emulate import fit_emulators
        from depthprune.recover.select import select_emulators

        lm = load_model(args.model_dir, load_tokenizer=False)
        fitted = fit_emulators(lm.model, fit, plan, config)
        _, decisions = select_emulators(lm.model, fitted, heldout, batch_size=args.samples, show_progress=False)
    else:
        from depthprune.streamed import StreamConfig, open_streamed, parse_bytes
        from depthprune.streamed.recover import (
            fit_emulators_streamed,
            select_emulators_streamed,
        )

        budget = parse_bytes(args.stream_budget) if args.stream_budget else None
        streamed = open_streamed(args.model_dir, StreamConfig(budget=budget))
        fitted = fit_emulators_streamed(streamed, fit, plan, config)
        _, decisions = select_emulators_streamed(streamed, fitted, heldout, batch_size=args.samples, show_progress=False)
        cost["stream_layer_reads"] = streamed.layer_reads
    save_file({f"{u}.{k}": v.contiguous() for u, e in fitted.items() if e is not None for k, v in e.state_dict().items()}, args.params)
    losses = {str(u): {"with": d.loss_with, "without": d.loss_without} for u, d in decisions.items()}
    return argparse.Namespace(
        scores={"heldout_loss_without": {u: v["without"] for u, v in losses.items()}},
        cost=cost,
        decisions={str(u): d.keep for u, d in decisions.items()},
    )


def run_child(arm: str, args: argparse.Namespace, model_dir: Path, tokens: Path) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else dict(os.environ)
    cmd = [sys.executable, __file__, "--child", arm, "--model-dir", str(model_dir), "--tokens", str(tokens),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--units", args.units, "--threads", str(args.threads)]
    if args.stream_budget:
        cmd += ["--stream-budget", args.stream_budget]
    if args.stage == "fit":
        cmd += ["--stage", "fit", "--fit-units", args.fit_units, "--recover", args.recover, "--heldout", str(args.heldout),
                "--params", str(tokens.parent / f"params-{arm}.safetensors")]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_wall_s"] = round(time.perf_counter() - start, 2)
    return result


def _params_diff(folder: Path) -> float:
    """Largest ``|a - b| / max|a|`` over each emulator tensor of the two arms."""
    from safetensors.torch import load_file

    a, b = load_file(str(folder / "params-memory.safetensors")), load_file(str(folder / "params-stream.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for metric, values in a.items():
        for unit, v in values.items():
            w = b[metric][unit]
            worst = max(worst, abs(v - w) / max(abs(v), 1e-30))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4, help="calibration sequences (one batch)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--units", default="block", help="unit kinds scored (default: block, to keep leave-one-out short)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    p.add_argument("--stream-budget", help="the streamed arm's memory budget, e.g. 64MB (default: none)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=256 << 10, help="bytes, both children; 0 leaves glibc's default")
    p.add_argument("--stage", choices=("score", "fit"), default="score",
                   help="score (static metrics + leave-one-out) or fit (prune --recover's emulator fit and held-out check)")
    p.add_argument("--fit-units", default="block.2,block.15", help="with --stage fit: the removed units")
    p.add_argument("--recover", default="lowrank:32", help="with --stage fit: their emulator (bias or lowrank:R)")
    p.add_argument("--heldout", type=float, default=0.25, help="with --stage fit: held-out fraction")
    p.add_argument("--params", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=("memory", "stream"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if not SMOLLM2.is_file() or not DATA.is_file():
        raise SystemExit(f"needs {SMOLLM2} and {DATA}")
    from safetensors.torch import save_file

    from depthprune.data import load_calibration
    from depthprune.gguf_import import convert_gguf
    from depthprune.loading import load_tokenizer_for

    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        model_dir = convert_gguf(SMOLLM2, Path(tmp) / "smollm2", "float32")
        tokenizer = load_tokenizer_for(str(model_dir), Path(model_dir))
        data = load_calibration(str(DATA), tokenizer, n_sequences=args.samples, seq_len=args.seq_len)
        tokens = Path(tmp) / "tokens.safetensors"
        save_file({"ids": data.input_ids.contiguous(), "mask": data.attention_mask.contiguous()}, str(tokens))
        weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        load_before = load_average()
        arms = {arm: run_child(arm, args, Path(model_dir), tokens) for arm in ("memory", "stream")}
        load_after = load_average()
        params_diff = _params_diff(tokens.parent) if args.stage == "fit" else None
    mem, st = arms["memory"], arms["stream"]
    rss_ratio = st["peak_rss_bytes"] / mem["peak_rss_bytes"]
    above = {arm: r["peak_rss_bytes"] - r["rss_after_imports_bytes"] for arm, r in arms.items()}
    wall_ratio = st["wall_s"] / mem["wall_s"]
    cpu_ratio = st["cpu_s"] / mem["cpu_s"]
    print(
        json.dumps(
            {
                "benchmark": "stream_memory",
                "model": f"{SMOLLM2.name} -> float32 safetensors ({weights:,} bytes)",
                "settings": {
                    "metrics": list(METRICS), "units": args.units, "samples": args.samples, "seq_len": args.seq_len,
                    "threads": args.threads, "stream_budget": args.stream_budget,
                    "malloc_mmap_threshold": args.malloc_mmap_threshold, "data": str(DATA),
                },
                "peak_rss_bytes": {"memory": mem["peak_rss_bytes"], "stream": st["peak_rss_bytes"]},
                "rss_after_imports_bytes": {"memory": mem["rss_after_imports_bytes"], "stream": st["rss_after_imports_bytes"]},
                "peak_above_imports_bytes": above,
                "rss_ratio": round(rss_ratio, 4),
                "above_imports_ratio": round(above["stream"] / above["memory"], 4),
                "rss_target": RSS_TARGET,
                "rss_met": rss_ratio <= RSS_TARGET,
                "wall_s": {"memory": mem["wall_s"], "stream": st["wall_s"]},
                "cpu_s": {"memory": mem["cpu_s"], "stream": st["cpu_s"]},
                "process_wall_s": {"memory": mem["process_wall_s"], "stream": st["process_wall_s"]},
                "wall_ratio": round(wall_ratio, 4),
                "cpu_ratio": round(cpu_ratio, 4),
                "time_target": TIME_TARGET,
                "time_met_wall": wall_ratio <= TIME_TARGET,
                "time_met_cpu": cpu_ratio <= TIME_TARGET,
                "max_rel_score_diff": max_rel_diff(mem["scores"], st["scores"]),
                **({"stage": "fit", "fit_units": args.fit_units, "recover": args.recover, "heldout": args.heldout,
                    "max_rel_param_diff": params_diff, "decisions": {"memory": mem["decisions"], "stream": st["decisions"]}}
                   if args.stage == "fit" else {}),
                "cost": {"memory": mem["cost"], "stream": st["cost"]},
                "load_average": {"before": load_before, "after": load_after},
            }
        )
    )


if __name__ == "__main__":
    main()
