"""Every CLI stage on a small model, and the numbers each writes, for comparing runs.

The device-map, torchrun and GPU checks run the same stages under different placements
and compare what comes out; this module is that list of stages in one place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

TEXT = " ".join(
    ["the quick brown fox jumps over the lazy dog", "and the cat sat on the mat", "the dog and the fox ran"] * 60
)


def stage_argvs(model: Path, text: Path, out: Path, extra: Sequence[str] = ()) -> dict[str, list[str]]:
    """Argument lists of every stage, writing into ``out``; ``extra`` places the model (e.g. ``--device cuda``).

    Seven calibration sequences, so that two or three ranks get uneven shares.
    """
    m, d, x = str(model), ["--data", str(text), "--samples", "7", "--seq-len", "24"], list(extra)
    ppl = f"ppl:{text},seq_len=24"
    return {
        "score": ["score", m, *d, *x, "--metrics", "cosine,angular,rel_l2,loo_loss,loo_kl", "-o", str(out / "score.json"), "-q"],
        "shapley": [
            "shapley", m, *d, *x, "--units", "block", "--estimator", "exact", "--batch-size", "3",
            "-o", str(out / "shapley.json"), "-q",
        ],
        "plan": ["plan", str(out / "score.json"), "--metric", "cosine", "--remove", "1", "-o", str(out / "plan.json")],
        "prune": ["prune", m, *x, "--plan", str(out / "plan.json"), "-o", str(out / "pruned"), "-q"],
        "recover": [
            "prune", m, *d, *x, "--plan", str(out / "plan.json"), "--recover", "lowrank:4", "-o", str(out / "recovered"), "-q",
        ],
        "eval": ["eval", m, *x, "--task", ppl, "--json", str(out / "eval.json")],
        "sweep": [
            "sweep", m, *x, "--scores", str(out / "score.json"), "--metrics", "cosine", "--units", "block",
            "--max-remove", "0.5", "--tasks", ppl, "-o", str(out / "sweep"), "-q",
        ],
    }


def run_stages(run: Callable[[list[str]], int], model: Path, text: Path, out: Path, extra: Sequence[str] = ()) -> None:
    """Run every stage with ``run(argv) -> exit code``, failing on the first nonzero code."""
    out.mkdir(parents=True, exist_ok=True)
    for name, argv in stage_argvs(model, text, out, extra).items():
        code = run(argv)
        assert code == 0, f"stage {name} exited {code}: {argv}"


def _numbers(node: object, prefix: str, into: dict[str, float]) -> None:
    if isinstance(node, bool):
        return
    if isinstance(node, (int, float)):
        into[prefix] = float(node)
    elif isinstance(node, dict):
        for k, v in node.items():
            _numbers(v, f"{prefix}/{k}", into)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _numbers(v, f"{prefix}/{i}", into)


_SKIP = ("seconds", "wall", "created", "time", "per_s", "tokens_per", "speed", "elapsed")


def collect(out: Path) -> dict[str, float]:
    """Every number the stages wrote (timings left out), and every weight of the two pruned models."""
    numbers: dict[str, float] = {}
    for name in ("score.json", "shapley.json", "plan.json", "eval.json", "sweep/sweep.json"):
        _numbers(json.loads((out / name).read_text()), name, numbers)
    numbers = {k: v for k, v in numbers.items() if not any(s in k.lower() for s in _SKIP)}
    for folder in ("pruned", "recovered"):
        numbers.update(collect_weights(out / folder))
    return numbers


def collect_weights(folder: Path) -> dict[str, float]:
    """Every weight entry of the model in ``folder``, keyed ``<folder name>/<tensor>/<index>``."""
    from safetensors.torch import load_file

    numbers: dict[str, float] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for key, tensor in load_file(str(path)).items():
            for i, v in enumerate(tensor.double().flatten().tolist()):
                numbers[f"{folder.name}/{key}/{i}"] = v
    return numbers


def compare(got: dict[str, float], want: dict[str, float], rel: float) -> list[str]:
    """Keys missing on either side, and values further apart than ``rel`` (relative, floor 1e-6 absolute)."""
    problems = [f"missing {k}" for k in sorted(set(want) ^ set(got))]
    for k in sorted(set(want) & set(got)):
        a, b = got[k], want[k]
        if not abs(a - b) <= rel * max(abs(a), abs(b), 1e-6 / rel):
            problems.append(f"{k}: {a!r} vs {b!r}")
    return problems


def all_on(model: torch.nn.Module, device_type: str) -> list[str]:
    """Names of parameters and buffers not on ``device_type``."""
    return [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type != device_type]


def main() -> int:
    """``python -m torch.distributed.run ... tests/stages.py MODEL TEXT OUT [EXTRA...]``: every
    stage in one process per rank, so the process group and imports are set up once."""
    import sys

    from depthprune.cli import main as cli
    from depthprune.distributed import init_from_env

    model, text, out, *extra = sys.argv[1:]
    with init_from_env("cuda" if "cuda" in extra else "cpu"):
        run_stages(cli, Path(model), Path(text), Path(out), extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
