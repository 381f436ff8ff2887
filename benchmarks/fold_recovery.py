"""Held-out loss of SmolLM2-135M with one block removed: plain removal, folded bias, folded
linear (ReplaceMe) and today's residual low-rank emulator.

Each method goes through ``prune_model`` (fit on calibration text, fold, export) and the
exported folder is loaded back and measured, so a folded row is the standard checkpoint a
serving engine would load. WikiText-2's test file is cut in two halves by characters:
calibration windows come from the first, held-out windows from the second. The held-out
check of ``prune`` is off here (``heldout=0``), so each row shows the emulator itself, fitted
on all calibration sequences.

    python benchmarks/fold_recovery.py [--units block.2,block.15] [--calib 16] [--eval 8] [--seq-len 128]

Prints one JSON line: the unpruned loss, and per (unit, method) the held-out loss, its
increase over the unpruned model, its ratio to plain removal's increase, the export's
``model_type``, where the stand-in was folded, and wall and CPU seconds of prune + load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.dont_write_bytecode = True  # importing _common must not write into the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, SMOLLM2  # noqa: E402

WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default=str(SMOLLM2))
    p.add_argument("--text", default=str(WIKI))
    p.add_argument("--units", default="block.2,block.15")
    p.add_argument("--methods", default="none,bias,linear:full,linear:64,lowrank:32")
    p.add_argument("--calib", type=int, default=16, help="calibration sequences")
    p.add_argument("--eval", type=int, default=8, help="held-out sequences")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import depthprune
    from depthprune.api import PruneConfig, prune_model
    from depthprune.data import load_calibration
    from depthprune.export import read_manifest
    from depthprune.gguf_import import convert_gguf
    from depthprune.loading import LoadConfig, load_model
    from depthprune.recover.compare import heldout_loss

    with tempfile.TemporaryDirectory(prefix="fold-recovery-") as tmp_name:
        tmp = Path(tmp_name)
        text = Path(args.text).read_text(encoding="utf-8")
        half = len(text) // 2
        (tmp / "calib.txt").write_text(text[:half], encoding="utf-8")
        (tmp / "eval.txt").write_text(text[half:], encoding="utf-8")
        model_dir = convert_gguf(args.gguf, tmp / "smollm2", "float32")
        source = load_model(str(model_dir))
        held = load_calibration(tmp / "eval.txt", source.tokenizer, n_sequences=args.eval, seq_len=args.seq_len, seed=1)
        baseline = heldout_loss(source.model, held)
        del source

        rows = []
        for unit in args.units.split(","):
            for method in args.methods.split(","):
                out = tmp / f"{unit}-{method.replace(':', '-')}"
                wall, cpu = time.perf_counter(), time.process_time()
                prune = PruneConfig(
                    out=out,
                    remove=unit,
                    recover=method,
                    data=str(tmp / "calib.txt") if method != "none" else None,
                    n_samples=args.calib,
                    seq_len=args.seq_len,
                    heldout=0.0,
                    show_progress=False,
                )
                prune_model(LoadConfig(str(model_dir), dtype="float32"), prune)
                model = depthprune.load(out, dtype="float32")
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                loss = heldout_loss(model, held)
                manifest = read_manifest(out)
                entry = ((manifest.get("recover") or {}).get("units") or {}).get(unit, {})
                config = json.loads((out / "config.json").read_text(encoding="utf-8"))
                rows.append(
                    {
                        "unit": unit,
                        "method": method,
                        "loss": round(loss, 4),
                        "delta_loss": round(loss - baseline, 4),
                        "model_type": config["model_type"],
                        "folded_into": entry.get("folded_into"),
                        "prune_load_wall_s": round(wall, 1),
                        "prune_load_cpu_s": round(cpu, 1),
                    }
                )
                del model
                print(json.dumps(rows[-1]), file=sys.stderr)
        for row in rows:
            plain = next(r for r in rows if r["unit"] == row["unit"] and r["method"] == "none")
            row["delta_vs_none"] = round(row["delta_loss"] / plain["delta_loss"], 3) if plain["delta_loss"] else None
        print(
            json.dumps(
                {
                    "benchmark": "fold_recovery",
                    "model": Path(args.gguf).name,
                    "calibration": {"source": "first half of " + Path(args.text).name, "n_sequences": args.calib, "seq_len": args.seq_len},
                    "heldout": {"source": "second half of " + Path(args.text).name, "n_sequences": args.eval, "seq_len": args.seq_len, "seed": 1},
                    "baseline_loss": round(baseline, 4),
                    "threads": args.threads,
                    "rows": rows,
                }
            )
        )


if __name__ == "__main__":
    main()
