"""GPU check: every CLI stage with ``--device cuda`` and ``--device-map auto`` against the CPU.

Meant for a lent GPU machine (no internet, other torch/transformers versions than ours):

    PYTHONPATH=src python benchmarks/gpu_check.py [--out gpu_check.json]

It builds a small random Llama and a byte-level tokenizer in a temporary folder (nothing
is downloaded), then runs the stages of ``tests/stages.py`` (score: static metrics and
leave-one-out; Shapley, exact; plan; prune; prune --recover lowrank; eval ppl; sweep)
three times in this process: on the CPU, with ``--device cuda`` and with
``--device-map auto``. For the GPU runs it checks that

- every parameter and buffer of every loaded model is on CUDA;
- no operation with a large result (> 4096 elements: activations, logits, statistics)
  ran on the CPU while a stage computed (loading and saving, which pass weights through
  the CPU by design, are left out), recorded by a TorchDispatchMode;
- every number the stages wrote, and every weight of the two pruned models, matches the
  CPU run within ``--rel`` (float32 on both; GPU kernels sum in another order).

Then ``score``/``eval``/``sweep`` and ``prune --recover`` with ``--stream --device cuda``
against the CPU run, and ``eval`` under ``torchrun --nproc-per-node 1`` (``nccl``).

Prints one JSON object, and exits 1 if a check failed. Takes well under a minute after
CUDA starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from stages import (
    _SKIP,
    TEXT,
    _numbers,
    all_on,
    collect,
    collect_weights,
    compare,
    stage_argvs,
)

LARGE = 4096  # elements; token ids and index tensors of these runs are smaller


class CpuOps(TorchDispatchMode):
    """Counts operations that produce a large tensor on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > LARGE:
                self.ops[str(func)] += 1
        return out


def build_model(folder: Path) -> None:
    """A random 4-layer Llama (hidden 64) and a 320-token byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_arm(name: str, model: Path, text: Path, out: Path, extra: list[str], device_type: str) -> dict[str, Any]:
    """Run every stage; record where loaded models live and CPU work during GPU runs."""
    import depthprune.api
    import depthprune.loading
    from depthprune.cli import main

    misplaced: list[str] = []
    real_load = depthprune.loading.load_model

    def checked_load(*args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():  # weights pass through the CPU while loading, by design
            lm = real_load(*args, **kwargs)
        misplaced.extend(all_on(lm.model, device_type)[:5])
        return lm

    real_export = depthprune.api.export

    def export(*args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():  # and while saving
            return real_export(*args, **kwargs)

    depthprune.loading.load_model = checked_load
    depthprune.api.load_model = checked_load
    depthprune.api.export = export
    report: dict[str, Any] = {"stages": {}}
    out.mkdir(parents=True)
    try:
        for stage, argv in stage_argvs(model, text, out, extra).items():
            mode = CpuOps() if device_type == "cuda" else None
            start = time.perf_counter()
            try:
                if mode is not None:
                    with mode:
                        code = main(argv)
                else:
                    code = main(argv)
            except Exception as exc:  # noqa: BLE001 - report and go on: one broken stage must not hide the others
                code = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            report["stages"][stage] = {
                "exit": code,
                "seconds": round(time.perf_counter() - start, 2),
                **({"large_cpu_ops": dict(mode.ops)} if mode is not None else {}),
            }
    finally:
        depthprune.loading.load_model = real_load
        depthprune.api.load_model = real_load
        depthprune.api.export = real_export
    report["params_not_on_" + device_type] = misplaced
    return report


def compare_scaled(got: dict[str, float], want: dict[str, float], rel: float) -> list[str]:
    """:func:`compare`, except that a weight's entries are compared on its tensor's scale.

    An entry of 1e-3 in a matrix whose entries reach 0.4 carries the matrix's rounding
    (here a float64 eigendecomposition on cuSOLVER against LAPACK), not its own: each
    tensor of the pruned models passes when max |gpu - cpu| <= rel * max |cpu|.
    """
    scalars = {k for k in want if not k.startswith(("pruned/", "recovered/"))}
    problems = compare({k: v for k, v in got.items() if k in scalars or k not in want},
                       {k: want[k] for k in scalars}, rel)
    tensors: dict[str, tuple[float, float]] = {}
    for k in set(want) - scalars:
        if k not in got:
            problems.append(f"missing {k}")
            continue
        name = k.rsplit("/", 1)[0]
        diff, scale = tensors.get(name, (0.0, 0.0))
        tensors[name] = (max(diff, abs(got[k] - want[k])), max(scale, abs(want[k])))
    problems += [f"{n}: max |diff| {d:.3g} > {rel} x scale {s:.3g}" for n, (d, s) in sorted(tensors.items())
                 if d > rel * max(s, 1e-6 / rel)]
    return problems


def stream_arm(root: Path, cpu: dict[str, float] | None, rel: float) -> dict[str, Any]:
    """``score``, ``eval`` and ``sweep`` with ``--stream`` on CUDA (layers read from disk onto the GPU) against the CPU run."""
    from depthprune.cli import main as cli

    argvs = stage_argvs(root / "model", root / "text.txt", root / "stream_cuda", ["--device", "cuda", "--stream"])
    (root / "stream_cuda").mkdir()
    from depthprune.streamed.checkpoint import LazyCheckpoint

    report: dict[str, Any] = {"stages": {}}
    devices: set[str] = set()
    real = {name: getattr(LazyCheckpoint, name) for name in ("load_", "read_rows")}
    real_open = LazyCheckpoint.open  # bound to the class
    open_attr = LazyCheckpoint.__dict__["open"]

    def outside(name: str) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            devices.add(str(self.device))
            with _disable_current_modes():  # weights pass through the CPU from the mapped files, by design
                return real[name](self, *args, **kwargs)
        return call

    def open_outside(*args: Any, **kwargs: Any) -> Any:
        # Building the skeleton: accelerate's init_empty_weights creates each parameter
        # with torch.empty on the CPU (pages never touched) and moves it to meta at once.
        with _disable_current_modes():
            return real_open(*args, **kwargs)

    for name in real:
        setattr(LazyCheckpoint, name, outside(name))
    LazyCheckpoint.open = staticmethod(open_outside)
    for stage in ("score", "eval", "sweep"):
        mode = CpuOps()
        with mode:
            try:
                code: Any = cli(argvs[stage])
            except Exception as exc:  # noqa: BLE001 - report and go on
                code = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        report["stages"][stage] = {"exit": code, "large_cpu_ops": dict(mode.ops)}
    for name, fn in real.items():
        setattr(LazyCheckpoint, name, fn)
    LazyCheckpoint.open = open_attr
    failed = [s for s, r in report["stages"].items() if r["exit"] != 0]
    report["failed_stages"] = failed
    report["checkpoint_devices"] = sorted(devices)
    ok = not failed and not any(r["large_cpu_ops"] for r in report["stages"].values()) and cpu is not None
    ok = ok and bool(devices) and all(d.startswith("cuda") for d in devices)
    if ok:
        got = _written(root / "stream_cuda", ("score.json", "eval.json", "sweep/sweep.json"))
        ok = _agrees(report, got, cpu, rel)
    report["ok"] = ok
    return report


def _written(folder: Path, names: tuple[str, ...]) -> dict[str, float]:
    """The numbers of the JSON files ``names`` in ``folder``, timings left out (as :func:`collect`)."""
    numbers: dict[str, float] = {}
    for name in names:
        _numbers(json.loads((folder / name).read_text()), name, numbers)
    return {k: v for k, v in numbers.items() if not any(s in k.lower() for s in _SKIP)}


def _agrees(report: dict[str, Any], got: dict[str, float], cpu: dict[str, float], rel: float) -> bool:
    """Compare the numbers both runs wrote (a streamed file may carry settings of its own);
    record the comparison in ``report``; true when something was compared and all agree."""
    want = {k: v for k, v in cpu.items() if k in got}
    diffs = compare({k: v for k, v in got.items() if k in want}, want, rel)
    report["compared"] = len(want)
    report["mismatches"] = len(diffs)
    report["first_mismatches"] = diffs[:10]
    return not diffs and bool(want)


def stream_recover_arm(root: Path, rel: float) -> dict[str, Any]:
    """``prune --recover lowrank:4 --stream --device cuda`` against the in-memory CPU prune.

    The fit and the held-out check stream onto the GPU; the keep-or-drop decisions and the
    exported weights must equal the CPU run's.
    """
    import shutil

    from depthprune.cli import main as cli

    out = root / "stream_recover"
    out.mkdir()
    shutil.copyfile(root / "cpu" / "plan.json", out / "plan.json")
    argv = stage_argvs(root / "model", root / "text.txt", out, ["--device", "cuda", "--stream"])["recover"]
    try:
        code: Any = cli(argv)
    except Exception as exc:  # noqa: BLE001 - report it
        code = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    report: dict[str, Any] = {"exit": code}
    if code != 0:
        report["ok"] = False
        return report
    def decisions(folder: Path) -> dict[str, str]:
        units = json.loads((folder / "depthprune.json").read_text())["recover"]["units"]
        return {unit: entry["decision"] for unit, entry in units.items()}

    diffs = compare_scaled(collect_weights(out / "recovered"), collect_weights(root / "cpu" / "recovered"), rel)
    report["mismatches"] = len(diffs)
    report["first_mismatches"] = diffs[:5]
    report["decisions"] = decisions(out / "recovered")
    report["decisions_equal"] = report["decisions"] == decisions(root / "cpu" / "recovered")
    report["execution"] = json.loads((out / "recovered" / "depthprune.json").read_text())["recover"].get("execution")
    report["ok"] = not diffs and report["decisions_equal"]
    return report


def torchrun_arm(root: Path, rel: float) -> dict[str, Any]:
    """``torchrun --nproc-per-node 1 ... eval --device cuda``: the nccl process group, all-reduce on CUDA."""
    import os
    import subprocess

    out = root / "torchrun"
    out.mkdir()
    argv = stage_argvs(root / "model", root / "text.txt", out, ["--device", "cuda"])["eval"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone", "-m", "depthprune", *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)
    report: dict[str, Any] = {"exit": proc.returncode}
    if proc.returncode != 0:
        report["stderr"] = proc.stderr[-2000:]
        report["ok"] = False
        return report
    report["ok"] = _agrees(report, _written(out, ("eval.json",)), _written(root / "cpu", ("eval.json",)), rel)
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rel", type=float, default=1e-3, help="relative tolerance against the CPU run (default: 1e-3)")
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args()
    result: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    try:
        import transformers

        result["transformers"] = transformers.__version__
        import accelerate

        result["accelerate"] = accelerate.__version__
    except ImportError as exc:
        result["import_error"] = str(exc)
    if not torch.cuda.is_available():
        result["ok"] = False
        result["error"] = "no CUDA device"
        print(json.dumps(result))
        return 1
    result["device"] = torch.cuda.get_device_name(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    torch.backends.cudnn.allow_tf32 = False
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        build_model(root / "model")
        (root / "text.txt").write_text(TEXT)
        arms = {"cpu": ([], "cpu"), "cuda": (["--device", "cuda"], "cuda"), "device_map_auto": (["--device-map", "auto"], "cuda")}
        numbers: dict[str, dict[str, float]] = {}
        for arm, (extra, device_type) in arms.items():
            report = run_arm(arm, root / "model", root / "text.txt", root / arm, extra, device_type)
            failed = [s for s, r in report["stages"].items() if r["exit"] != 0]
            cpu_work = {s: r["large_cpu_ops"] for s, r in report["stages"].items() if r.get("large_cpu_ops")}
            report["failed_stages"] = failed
            if not failed:
                numbers[arm] = collect(root / arm)
            if arm != "cpu" and "cpu" in numbers and arm in numbers:
                diffs = compare_scaled(numbers[arm], numbers["cpu"], args.rel)
                report["mismatches"] = len(diffs)
                report["first_mismatches"] = diffs[:10]
                report["max_rel_diff"] = max(
                    (abs(a - numbers["cpu"][k]) / max(abs(a), abs(numbers["cpu"][k]), 1e-12)
                     for k, a in numbers[arm].items() if k in numbers["cpu"]), default=0.0,
                )
            arm_ok = not failed and not report["params_not_on_" + device_type] and not cpu_work
            arm_ok = arm_ok and report.get("mismatches", 0) == 0
            report["ok"] = arm_ok
            ok = ok and arm_ok
            result[arm] = report
        result["stream_cuda"] = stream_arm(root, numbers.get("cpu"), args.rel)
        ok = ok and result["stream_cuda"]["ok"]
        result["stream_recover_cuda"] = stream_recover_arm(root, args.rel)
        ok = ok and result["stream_recover_cuda"]["ok"]
        result["torchrun_nccl"] = torchrun_arm(root, args.rel)
        ok = ok and result["torchrun_nccl"]["ok"]
        result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    result["ok"] = ok
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
