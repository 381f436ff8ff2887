"""Time and memory of fitting closed-form emulators for all removed units, against a forward pass.

Builds a random Llama of about 100M parameters and runs, over the same calibration tokens
and in the same process, alternating to cancel drift:

- ``plain``: ``model(ids)`` batch by batch, one calibration forward pass with full logits;
- ``plain_last``: the same with ``logits_to_keep=1`` (no full LM head);
- ``fit``: ``depthprune.recover.fit_emulators`` for every planned unit: one hooked pass
  (float64 moment accumulators, stopping after the last planned layer) and the
  reduced-rank ridge solves.

The default plan has units in the model's last layer, so the fit's pass runs every layer
and is compared with a forward pass doing the same work (a plan that ends earlier makes
the fit look cheaper than it is; the script warns about one).

Peak memory above the loaded model is measured in a fresh subprocess per mode (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``). The float64 accumulators
take ``2 * D * D * 8`` bytes per low-rank unit, reported as ``accumulator_bytes``.

Prints one JSON line and writes nothing. Usage: ``python benchmarks/recover_fit.py [--repeats 3]``.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # importing _common must not write into the repository

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from _common import add_model_args, build, data, median_times, memory_child, peak_memory  # noqa: E402


def default_plan(n_layers: int) -> str:
    """Six units spread over the model, two of them in its last layer (12 layers: block.4,
    attn.6, mlp.7, block.9, attn.11, mlp.11)."""
    n = n_layers
    return (
        f"block.{n // 3}:lowrank:64,attn.{n // 2}:lowrank:64,mlp.{n // 2 + 1}:bias,"
        f"block.{3 * n // 4}:lowrank:64,attn.{n - 1}:lowrank:64,mlp.{n - 1}:lowrank:64"
    )


def plan(args: argparse.Namespace) -> dict:
    from depthprune.units import Unit

    out = {}
    for item in (args.plan or default_plan(args.layers)).split(","):
        name, replace = item.split(":", 1)
        out[Unit.parse(name, args.layers)] = replace
    return out


def step(mode: str, model: torch.nn.Module, batches, args: argparse.Namespace) -> None:  # noqa: ANN001
    from depthprune.recover import EmulationConfig, fit_emulators

    with torch.no_grad():
        if mode == "fit":
            fit_emulators(model, batches, plan(args), EmulationConfig(batch_size=args.micro_batch, show_progress=False))
            return
        for ids, mask in batches.batches(args.micro_batch):
            if mode == "plain":
                model(ids, attention_mask=mask, use_cache=False)
            else:
                model(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, batch=8)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass")
    p.add_argument("--plan", help="unit:replace pairs, comma-separated (default: six units, two in the last layer)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.memory_child:
        model, batches = build(args), data(args)
        tiny = data(argparse.Namespace(**{**vars(args), "batch": 1, "seq_len": 8}))
        memory_child(lambda: step(args.memory_child, model, batches, args), lambda: step("plain_last", model, tiny, args))
        return

    from depthprune.recover import parse_replace

    last = max(u.index for u in plan(args))
    if last != args.layers - 1:
        print(
            f"warning: the plan's last unit is in layer {last} of {args.layers}; the fit stops there and is compared "
            "with a full forward pass",
            file=sys.stderr,
        )
    model, batches = build(args), data(args)
    modes = ("plain", "plain_last", "fit")
    step("fit", model, batches, args)  # warm-up
    med = median_times(modes, lambda mode: step(mode, model, batches, args), args.repeats)
    memory = peak_memory(__file__, modes)

    units = plan(args)
    n_lowrank = sum(parse_replace(r)[0] == "lowrank" for r in units.values())
    print(
        json.dumps(
            {
                "benchmark": "recover_fit",
                "params": sum(p.numel() for p in model.parameters()),
                "hidden": args.hidden,
                "tokens": batches.info.n_tokens,
                "units": {str(u): r for u, r in units.items()},
                "threads": torch.get_num_threads(),
                "median_s": med,
                "ratio_fit_vs_plain": med["fit"] / med["plain"],
                "ratio_fit_vs_plain_last": med["fit"] / med["plain_last"],
                "peak_mem_above_model_bytes": memory,
                "accumulator_bytes": n_lowrank * 2 * args.hidden * args.hidden * 8,
                "target": "ratio_fit_vs_plain <= 1.5",
            }
        )
    )


if __name__ == "__main__":
    main()
