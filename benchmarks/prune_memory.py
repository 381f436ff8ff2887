"""Peak memory of pruning by rewriting safetensors shards against pruning in memory.

Converts the shared SmolLM2-135M GGUF once to a float32 Hugging Face folder (538 MB of
weights) in a temporary folder, then prunes it twice, each in a fresh subprocess: by
rewriting the shards (``depthprune prune``'s default when nothing is emulated) and in
memory (``--in-memory``: load, prune, ``save_pretrained``). Each child reports its peak
resident memory (Linux ``VmHWM``) in total and above what was resident after importing
depthprune, transformers and torch, with its wall and CPU time. Prints one JSON line.

    PYTHONPATH=src python benchmarks/prune_memory.py [--model path/to/hf-folder]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SMOLLM2, _status, load_average

REMOVE = "block.3,block.17,attn.20"
MODES = ("on_disk", "in_memory")


def _child(model: str, mode: str, out: str) -> None:
    import torch  # noqa: F401 - imported before the baseline, as the prune imports it
    import transformers  # noqa: F401

    from depthprune.api import PruneConfig, prune_model
    from depthprune.loading import LoadConfig

    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    wall, cpu = time.perf_counter(), time.process_time()
    prune_model(LoadConfig(model), PruneConfig(out=Path(out), remove=REMOVE, rewrite_shards=mode == "on_disk"))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status("VmHWM")
    print(json.dumps({"peak_rss_bytes": peak, "peak_above_imports_bytes": peak - base, "wall_s": wall, "cpu_s": cpu}))


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face folder with safetensors weights (default: SmolLM2 converted to float32)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="prune-memory-") as tmp:
        if args.model:
            model = Path(args.model)
        else:
            from depthprune.gguf_import import convert_gguf

            if not SMOLLM2.is_file():
                raise SystemExit(f"SmolLM2 not found at {SMOLLM2}; pass --model")
            model = convert_gguf(SMOLLM2, Path(tmp) / "smollm2", "float32")
        results = {}
        for mode in MODES:
            out = Path(tmp) / mode
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(model), mode, str(out)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            results[mode]["output_weights_bytes"] = _weights_bytes(out)
        figures = {
            "benchmark": "prune_memory",
            "model": str(args.model or SMOLLM2.name + " (float32)"),
            "remove": REMOVE,
            "model_weights_bytes": _weights_bytes(model),
            **results,
            "peak_above_imports_ratio_on_disk_to_in_memory": round(
                results["on_disk"]["peak_above_imports_bytes"] / results["in_memory"]["peak_above_imports_bytes"], 4
            ),
            "peak_above_imports_on_disk_to_model_size": round(
                results["on_disk"]["peak_above_imports_bytes"] / _weights_bytes(model), 4
            ),
            "load_average": load_average(),
        }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
