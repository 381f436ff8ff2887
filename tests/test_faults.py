"""kill -9 of `depthprune run` at every stage, then a rerun: the results are bitwise those
of an uninterrupted run (issue 13, class 8; the README's "killed runs resume").

Compared bitwise: every file of the run folder except the two below (recipe.json,
stages.json, scores.json, scores.png, plan.json, every file of model/, sweep/sweep.json
and the sweep plots).

Not compared bitwise, because they hold wall-clock measurements:
- eval.json: each task's ``seconds`` and the prefill/decode ``speed`` of both models;
  everything else in it (task results, parameters, layers, KV-cache bytes) is compared
  exactly.
- report.html: it shows those speed measurements.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_model, tiny_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"
TEXT = "the quick brown fox jumps over the lazy dog and the cat sat on the mat. " * 60
TIMED = ("eval.json", "report.html")


def _recipe(model: Path, data: Path) -> dict[str, Any]:
    return {
        "model": str(model),
        "data": {"source": str(data), "samples": 4, "seq_len": 16},
        "tasks": [f"ppl:{data},seq_len=16,max_tokens=256"],
        "recover": "bias",
        "score": {"metrics": ["cosine", "loo_loss"], "units": ["block", "attn"]},
        "plan": {"metric": "loo_loss", "units": "block", "remove": 1},
        "sweep": {"metrics": ["cosine", "loo_loss"], "units": "attn", "max_remove": 2},
    }


def _start(recipe: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "depthprune", "run", str(recipe), "-o", str(out)], stdout=fh, stderr=subprocess.STDOUT, env=env
        )


def _kill_when(proc: subprocess.Popen[bytes], log: Path, seen: Any, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as ``seen(log text)`` holds; ``False`` if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if seen(log.read_text(errors="replace")):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"timed out; log:\n{log.read_text()}")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _untimed(eval_doc: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(eval_doc))
    for side in doc.values():
        side.pop("speed", None)
        for task in side.get("tasks", {}).values():
            task.pop("seconds", None)
    return doc


ALL_STAGES = ("score", "plan", "prune", "evaluate", "sweep", "report")


@pytest.mark.parametrize(
    "stages",
    [
        # The default suite kills while scoring (a rerun must make the same scores.json,
        # hence the same plan) and in the middle of the model's export (the temporary
        # folder a kill leaves must be cleaned up); about 20 s of CPU.
        pytest.param(("score", "prune"), id="score-prune"),
        # Every stage: eight processes, about 45 s of CPU.
        pytest.param(ALL_STAGES, id="every-stage", marks=pytest.mark.slow),
    ],
)
def test_kill_then_resume_is_bitwise_identical(tmp_path: Path, stages: tuple[str, ...]) -> None:
    model, data = tmp_path / "model", tmp_path / "calib.txt"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    data.write_text(TEXT)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe(model, data)))
    out, log = tmp_path / "runs" / "r", tmp_path / "log.txt"
    out.parent.mkdir()

    proc = _start(recipe, out, log)
    assert proc.wait(timeout=300) == 0, log.read_text()
    reference = _files(out)
    out.rename(tmp_path / "runs" / "reference")

    def mid_prune(text: str) -> bool:  # the model's temporary folder exists: mid-export
        return "[prune] running" in text and any(p.name.startswith(".model.tmp-") for p in out.iterdir())

    def mid_sweep(text: str) -> bool:  # some points of the sweep are written, not all
        return (out / "sweep" / "sweep.json").exists()

    triggers = [
        ("score", lambda t: "[score] running" in t),
        ("plan", lambda t: "[plan] running" in t),
        ("prune", mid_prune),
        ("evaluate", lambda t: "[evaluate] running" in t),
        ("sweep", mid_sweep),
        ("report", lambda t: "[report] running" in t),
    ]
    killed = []
    for stage, seen in triggers:
        if stage not in stages:
            continue
        if _kill_when(_start(recipe, out, log), log, seen):
            done = json.loads((out / "stages.json").read_text()) if (out / "stages.json").exists() else {}
            killed.append((stage, sorted(done)))
    # Most stages take long enough that the kill lands inside them; a kill can land in a
    # later stage only when the earlier one finished within the polling interval.
    print(json.dumps({"killed_at": killed}))
    assert len(killed) >= len(stages) - 1, killed
    proc = _start(recipe, out, log)
    assert proc.wait(timeout=300) == 0, log.read_text()

    resumed = _files(out)
    assert sorted(resumed) == sorted(reference), "other files (a temporary leftover?)"
    for name in reference:
        if name in TIMED:
            continue
        assert resumed[name] == reference[name], f"{name} differs after kill -9 and resume"
    assert _untimed(json.loads(resumed["eval.json"])) == _untimed(json.loads(reference["eval.json"]))
    assert sorted(p.name for p in out.parent.iterdir()) == ["r", "reference"]
    digest = hashlib.sha256(reference["plan.json"]).hexdigest()
    assert digest == hashlib.sha256(resumed["plan.json"]).hexdigest()
    shutil.rmtree(tmp_path / "runs")
