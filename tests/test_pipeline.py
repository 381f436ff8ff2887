"""Recipes: validation, stage resume, and the offline demo end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from depthprune import pipeline
from depthprune.cli import main
from depthprune.errors import InputError
from depthprune.recipe import recipe_from_dict
from depthprune.testbed import TestbedConfig, build_testbed


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TestbedConfig(layers=3, hidden=32, steps=30, n_stories=200, batch=8, seq_len=64)
    return build_testbed(config, out=tmp_path_factory.mktemp("tb") / "model", show_progress=False)


def _recipe(model: Path, **over: Any) -> dict[str, Any]:
    data = {
        "model": str(model),
        "data": {"source": str(model / "calibration.txt"), "samples": 4, "seq_len": 32},
        "tasks": [f"ppl:{model / 'eval.txt'},seq_len=32,max_tokens=512"],
        "score": {"metrics": ["cosine", "loo_loss"], "units": ["block", "attn"]},
        "plan": {"metric": "loo_loss", "units": "block", "remove": 1},
        "sweep": {"metrics": ["cosine", "loo_loss"], "units": "attn", "max_remove": 1},
    }
    return {**data, **over}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(modle="x"), "unknown key 'modle' in recipe. Did you mean: model?"),
        (lambda d: d["plan"].update(metrc="cosine"), "unknown key 'metrc' in plan. Did you mean: metric?"),
        (lambda d: d.pop("model"), "missing the required key 'model'"),
        (lambda d: d["data"].pop("source"), "data is missing the required key 'source'"),
        (lambda d: d.update(score=["cosine"]), "score must be a mapping"),
        (lambda d: d.update(tasks="ppl:x"), "tasks must be a list"),
    ],
)
def test_recipe_validation(mutate: Any, needle: str, tmp_path: Path) -> None:
    data = _recipe(tmp_path)
    mutate(data)
    with pytest.raises(InputError) as err:
        recipe_from_dict(data)
    assert needle in str(err.value)


def test_run_cli_refuses_bad_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("model: m\ndata: {source: x}\nsweeep: null\n")
    assert main(["run", str(path), "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Did you mean: sweep?" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"data": {"source": "/no/such/calib.txt"}}, "data path '/no/such/calib.txt' does not exist"),
        ({"tasks": ["ppx:eval.txt"]}, "Did you mean: ppl?"),
        ({"plan": {"metric": "angular"}}, "plan.metric 'angular' is not among score.metrics"),
        ({"recover": "lowrank"}, "lowrank"),
    ],
)
def test_bad_recipe_writes_nothing(over: dict[str, Any], needle: str, testbed: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(InputError, match=needle):
        pipeline.run_recipe(recipe_from_dict(_recipe(testbed, **over)), out, show_progress=False)
    assert not out.exists()


def test_resume_after_a_killed_run(testbed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_from_dict(_recipe(testbed))
    out = tmp_path / "run"

    def killed(ctx: pipeline.RunContext) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline._RUNNERS, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(recipe, out, show_progress=False)
    assert (out / "scores.json").is_file() and (out / "model" / "depthprune.json").is_file()
    assert not (out / "eval.json").exists()
    stamps = {p: (out / p).stat().st_mtime_ns for p in ("scores.json", "plan.json", "model/model.safetensors")}
    monkeypatch.undo()

    seen: list[tuple[str, bool]] = []
    report = pipeline.run_recipe(recipe, out, show_progress=False, on_stage=lambda s, skip: seen.append((s, skip)))
    assert seen == [("score", True), ("plan", True), ("prune", True), ("evaluate", False), ("sweep", False), ("report", False)]
    assert {p: (out / p).stat().st_mtime_ns for p in stamps} == stamps
    assert report.is_file()
    ev = json.loads((out / "eval.json").read_text())
    assert ev["pruned"]["params"] < ev["original"]["params"]
    assert ev["pruned"]["kv_cache_bytes_per_token"] == pytest.approx(ev["original"]["kv_cache_bytes_per_token"] * 2 / 3)

    seen.clear()
    pipeline.run_recipe(recipe, out, show_progress=False, on_stage=lambda s, skip: seen.append((s, skip)))
    assert all(skip for _, skip in seen)

    # A new plan reruns the plan and what follows it, not the scores.
    seen.clear()
    changed = recipe_from_dict(_recipe(testbed, plan={"metric": "cosine", "units": "block", "remove": 1}))
    pipeline.run_recipe(changed, out, show_progress=False, on_stage=lambda s, skip: seen.append((s, skip)))
    assert dict(seen) == {"score": True, "plan": False, "prune": False, "evaluate": False, "sweep": True, "report": False}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`depthprune demo` on a fresh cache, once for the tests below."""
    tmp = tmp_path_factory.mktemp("demo")
    # One torch thread, as conftest gives the test process: on two shared cores a second
    # OpenMP thread that gets preempted stalls the first at every barrier of the training.
    env = {**os.environ, "DEPTHPRUNE_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "depthprune", "demo", "-o", str(tmp / "demo")], env=env, capture_output=True, text=True)
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return proc, tmp / "demo"


@pytest.mark.slow
def test_demo_end_to_end(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """The demo trains the testbed, runs every stage and writes a self-contained report."""
    proc, out = demo_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = (out / "report.html").read_text()
    for needle in ("Plan", "Quality before and after", "KV-cache bytes per token", "prefill, tokens/s", "decode, tokens/s", "depthprune score", "Sweep"):
        assert needle in html, needle
    assert html.count("data:image/png;base64,") == 2
    assert "http://" not in html and "https://" not in html  # self-contained
    ev = json.loads((out / "eval.json").read_text())
    assert ev["pruned"]["params"] < ev["original"]["params"]
    for side in ev.values():
        speed = side["speed"]
        for phase in ("prefill", "decode"):
            values = speed[f"{phase}_tokens_per_second"]
            assert len(values) == speed["repeats"] and all(v > 0 for v in values)


@pytest.mark.slow
def test_demo_report_renders(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The demo's report.html renders to a non-blank page in headless Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed; the report's rendering was not checked")
    proc, out = request.getfixturevalue("demo_run")  # after the check: no demo run only to skip
    if proc.returncode != 0:
        pytest.fail("the demo failed, so there is no report to render (see test_demo_end_to_end)")
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}",
         "--window-size=1200,2000", f"--screenshot={shot}", (out / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000  # a blank page compresses to a few KB
