"""The battery of bad inputs (issue 13): every subcommand, one row per input.

For every row the CLI must
- exit with code 2,
- print exactly one line on stderr (``depthprune: error: ...``), with no traceback,
- leave nothing behind: the work folder holds exactly what it held before (so no output,
  no temporary files), and
- leave the source folder (models, data, scores, plans, recipes) bitwise unchanged.

Rows run in-process (``cli.main`` with ``capsys``); only those that need a process of
their own (a read-only folder for root, a file size limit) run ``python -m depthprune``.
To add a row, append a :class:`Row` to ``ROWS``; placeholders in its arguments name the
fixture's files (see :func:`_paths`).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import shared_dir, tiny_model, tiny_tokenizer

from depthprune.cli import main
from depthprune.testbed import TestbedConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
TEXT = " ".join(
    ["the quick brown fox jumps over the lazy dog and the cat sat on the mat."] * 40
)


@dataclass(frozen=True)
class Row:
    """One bad input.

    Attributes:
        id: The test id.
        args: The command line; ``{name}`` placeholders are filled from :func:`_paths`.
        needle: A piece of the expected error line.
        setup: Prepares the work folder ``W`` (an existing file, a read-only folder...).
        mode: ``inproc``; ``readonly`` (a subprocess that may not write a read-only
            folder, even as root); ``fsize`` (a subprocess under a file size limit, as
            ``ulimit -f``).
        needs: Fixture paths the row needs (``L``: stories260K from ../shared).
        xfail: Why the row is expected to fail for now (marked strict), or ``""``.
    """

    id: str
    args: str
    needle: str
    setup: Callable[[Path], None] | None = None
    mode: str = "inproc"
    needs: tuple[str, ...] = ()
    xfail: str = ""
    env: dict[str, str] = field(default_factory=dict)


def _file(name: str) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        (w / name).write_text("precious\n")

    return make


def _folder(name: str) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        (w / name).mkdir()
        (w / name / "keep.txt").write_text("precious\n")

    return make


def _readonly(w: Path) -> None:
    (w / "ro").mkdir()
    (w / "ro").chmod(0o555)


ROWS: list[Row] = [
    # --- class 3: an output in (or around) a model folder or an input the command reads
    Row("convert-llama2c-out-holds-source", "convert-llama2c {L}/stories260K.bin {L}/tok512.bin -o {L} --force", "source model", needs=("L",)),
    Row("convert-llama2c-out-is-source", "convert-llama2c {L}/stories260K.bin {L}/tok512.bin -o {L} --force", "source model", needs=("L",)),
    Row("convert-gguf-out-holds-file", "convert-gguf {G} -o {GD} --force", "source model"),
    Row("convert-gguf-out-is-file", "convert-gguf {G} -o {G} --force", "source model"),
    Row("score-out-in-model", "score {M} --data {D} --samples 2 --seq-len 16 --metrics cosine -o {M}/scores.json", "source model"),
    Row("score-out-is-gguf", "score {G} --data {D} -o {G} --force", "source model"),
    Row("score-plot-in-model", "score {M} --data {D} --metrics cosine -o {W}/s.json --plot {M}/s.png", "source model"),
    Row("score-checkpoint-in-model", "score {M} --data {D} --metrics cosine -o {W}/s.json --checkpoint {M}/ck.json", "source model"),
    Row("shapley-out-in-model", "shapley {M} --data {D} --samples 2 --seq-len 16 -o {M}/sh.json", "source model"),
    Row("iterative-out-in-model", "iterative {M} --data {D} --samples 2 --seq-len 16 --remove 1 -o {M}/plan.json", "source model"),
    Row("plan-out-in-scores-model", "plan {S} --metric cosine --remove 1 -o {M}/plan.json", "source model"),
    Row("plan-out-is-its-scores", "plan {S} --metric cosine --remove 1 -o {S} --force", "replace the input"),
    Row("prune-out-in-model", "prune {M} --remove block.1 -o {M}/pruned", "source model"),
    Row("prune-out-is-model", "prune {M} --remove block.1 -o {M} --force", "source model"),
    Row("prune-out-holds-model", "prune {M} --remove block.1 -o {SRC} --force", "source model"),
    Row("prune-out-is-its-plan", "prune {M} --plan {P} -o {P} --force", "replace the input"),
    Row("eval-json-is-its-data", "eval {M} --task ppl:{D},seq_len=16 --json {D} --force", "replace the input"),
    Row("recover-out-in-model", "recover-compare {M} --remove block.1 --data {D} -o {M}/cmp.json", "source model"),
    Row("eval-json-in-model", "eval {M} --task ppl:{D},seq_len=16 --json {M}/eval.json", "source model"),
    Row("sweep-out-in-model", "sweep {M} --scores {S} --metrics cosine --max-remove 1 --tasks ppl:{D} -o {M}/sweep", "source model"),
    Row("run-out-in-model", "run {R} -o {M}/run", "source model"),
    Row("run-out-is-model", "run {R} -o {M}", "source model"),
    Row("demo-out-in-testbed", "demo -o {TB}/run", "source model"),
    # --- class 4: OS errors
    Row("sweep-out-is-a-file", "sweep {M} --scores {S} --metrics cosine --max-remove 1 --tasks ppl:{D} -o {W}/f", "is a file", _file("f")),
    Row("run-out-is-a-file", "run {R} -o {W}/f", "is a file", _file("f")),
    Row("demo-out-is-a-file", "demo -o {W}/f", "is a file", _file("f")),
    Row("prune-force-onto-a-file", "prune {M} --remove block.1 -o {W}/f --force", "is a file", _file("f")),
    Row("plan-force-onto-a-folder", "plan {S} --metric cosine --remove 1 -o {W}/d --force", "is a folder", _folder("d")),
    Row("eval-json-force-onto-a-folder", "eval {M} --task ppl:{D} --json {W}/d --force", "is a folder", _folder("d")),
    Row("score-parent-is-a-file", "score {M} --data {D} --metrics cosine -o {W}/f/s.json", "is a file, not a folder", _file("f")),
    Row("demo-missing-parent", "demo -o {W}/missing/run", "does not exist"),
    Row("testbed-missing-parent", "testbed --steps 1 -o {W}/missing/tb", "does not exist"),
    Row("prune-read-only-folder", "prune {M} --remove block.1 -o {W}/ro/out", "permission denied", _readonly, mode="readonly"),
    Row("score-read-only-folder", "score {M} --data {D} --samples 2 --seq-len 16 --metrics cosine -o {W}/ro/s.json", "permission denied", _readonly, mode="readonly"),
    Row("prune-disk-full", "prune {M} --remove block.1 -o {W}/out", "file size limit", mode="fsize"),
    Row("score-disk-full", "score {M} --data {D} --samples 2 --seq-len 16 --metrics cosine,rel_l2 -o {W}/s.json", "file size limit", mode="fsize"),
    # --- existing outputs
    Row("prune-out-exists", "prune {M} --remove block.1 -o {W}/d", "already exists", _folder("d")),
    Row("score-out-exists", "score {M} --data {D} --metrics cosine -o {W}/f", "already exists", _file("f")),
    Row("plan-out-exists", "plan {S} --metric cosine --remove 1 -o {W}/f", "already exists", _file("f")),
    Row("testbed-out-exists", "testbed --steps 1 -o {W}/d", "already exists", _folder("d")),
    # --- missing or malformed inputs
    Row("prune-missing-model", "prune {W}/no-model --remove block.0 -o {W}/out", "does not exist"),
    Row("prune-unit-out-of-range", "prune {M} --remove block.9 -o {W}/out", "out of range"),
    Row("prune-unit-typo", "prune {M} --remove blok.1 -o {W}/out", "Did you mean: block?"),
    Row("prune-nothing-to-remove", "prune {M} -o {W}/out", "nothing to remove"),
    Row("prune-remove-and-plan", "prune {M} --remove block.1 --plan {P} -o {W}/out", "only one"),
    Row("prune-emulation-without-data", "prune {M} --remove attn.1 --recover bias -o {W}/out", "--data"),
    Row("prune-every-block", "prune {M} --remove block.0,block.1,block.2,block.3 -o {W}/out", "every block"),
    Row("score-missing-data", "score {M} --data {W}/no.txt -o {W}/s.json", "does not exist"),
    Row("score-metric-typo", "score {M} --data {D} --metrics cosin -o {W}/s.json", "Did you mean: cosine?"),
    Row("shapley-estimator-typo", "shapley {M} --data {D} --estimator exakt -o {W}/sh.json", "Did you mean: exact?"),
    Row("shapley-loss-without-data", "shapley {M} -o {W}/sh.json", "--data"),
    Row("plan-missing-scores", "plan {W}/no.json --metric cosine -o {W}/plan.json", "does not exist"),
    Row("plan-unknown-metric", "plan {S} --metric angulr --remove 1 -o {W}/plan.json", "angulr"),
    Row("plan-no-output", "plan {S} --metric cosine --remove 1", "no output given"),
    Row("eval-task-typo", "eval {M} --task ppx:{D}", "Did you mean: ppl?"),
    Row("eval-batch-size-zero", "eval {M} --task ppl:{D} --batch-size 0", "--batch-size"),
    Row("sweep-unknown-metric", "sweep {M} --scores {S} --metrics angulr --max-remove 1 --tasks ppl:{D} -o {W}/sw", "angulr"),
    Row("run-missing-recipe", "run {W}/no.yaml -o {W}/run", "does not exist"),
    Row("run-no-recipe-no-model", "run -o {W}/run", "give a recipe file"),
    Row("run-plan-metric-not-scored", "run {R} --metric angular -o {W}/run", "not among score.metrics"),
    Row("recover-no-ranking", "recover-compare {M} --data {D} -o {W}/c.json", "exactly one of"),
    Row("convert-llama2c-missing-input", "convert-llama2c {W}/no.bin {W}/no-tok.bin -o {W}/hf", "does not exist"),
    Row("convert-gguf-missing-input", "convert-gguf {W}/no.gguf -o {W}/hf", "does not exist"),
    # --- classes 1, 2, 5, 6 and 7 (the loader, the recipe schema, made-for checks, units, data)
    Row("prune-duplicate-units", "prune {M} --remove block.1,block.1 -o {W}/out", "block.1"),  # class 7
    Row("score-samples-not-a-number", "score {M} --data {D} --samples abc -o {W}/s.json", "abc"),  # class 7
    Row("score-latin1-jsonl", "score {M} --data {LATIN1} -o {W}/s.json", "UTF-8"),  # class 7
    Row("score-missing-cuda-device", "score {M} --data {D} --device cuda:7 -o {W}/s.json", "cuda:7"),  # class 7
    Row("score-pickle-only-model", "score {PICKLE} --data {D} -o {W}/s.json", "safetensors"),  # class 2
    Row("score-config-claims-more-layers", "score {BIGCFG} --data {D} -o {W}/s.json", "layers"),  # class 1
    Row("run-recipe-samples-not-a-number", "run {R_BADSAMPLES} -o {W}/run", "many"),
    Row("run-recipe-remove-not-a-number", "run {R_BADREMOVE} -o {W}/run", "two"),  # class 5
    Row("sweep-scores-of-another-model", "sweep {M} --scores {S32} --metrics cosine --max-remove 1 --tasks ppl:{D} -o {W}/sw", "layers"),  # class 6
]


def _tree_hash(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones too) -> its content hash."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = "link" if os.path.islink(p) else hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def _save_model(path: Path, **overrides: Any) -> None:
    tiny_model("llama", **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The source folder: a tiny Llama, data, scores, a plan, a recipe, a GGUF stand-in,
    a cached testbed model and the inputs of the rel-a rows."""
    root = tmp_path_factory.mktemp("bad_inputs")
    src = root / "src"
    model = src / "model"
    _save_model(model)
    data = src / "data" / "calib.txt"
    data.parent.mkdir(parents=True)
    data.write_text(TEXT + "\n")
    paths: dict[str, Path] = {"SRC": src, "M": model, "D": data}
    paths["S"] = src / "scores.json"
    assert main(["-q", "score", str(model), "--data", str(data), "--samples", "2", "--seq-len", "16",
                 "--metrics", "cosine,rel_l2", "-o", str(paths["S"])]) == 0
    paths["P"] = src / "plan.json"
    assert main(["-q", "plan", str(paths["S"]), "--metric", "cosine", "--remove", "1", "-o", str(paths["P"])]) == 0
    paths["R"] = src / "recipe.json"
    recipe = {
        "model": str(model),
        "data": {"source": str(data), "samples": 2, "seq_len": 16},
        "tasks": [f"ppl:{data},seq_len=16"],
        "score": {"metrics": ["cosine", "rel_l2"], "units": ["block"]},
        "plan": {"metric": "cosine", "units": "block", "remove": 1},
        "sweep": None,
    }
    paths["R"].write_text(json.dumps(recipe))
    paths["R_BADSAMPLES"] = src / "recipe-bad-samples.json"
    paths["R_BADSAMPLES"].write_text(json.dumps({**recipe, "data": {**recipe["data"], "samples": "many"}}))
    paths["R_BADREMOVE"] = src / "recipe-bad-remove.json"
    paths["R_BADREMOVE"].write_text(json.dumps({**recipe, "plan": {**recipe["plan"], "remove": "two"}}))
    # A GGUF stand-in: the refusals come before the file is read.
    paths["GD"] = src / "gguf"
    paths["GD"].mkdir()
    paths["G"] = paths["GD"] / "model.gguf"
    paths["G"].write_bytes(b"GGUF" + bytes(60))
    # The demo's cached testbed model (DEPTHPRUNE_CACHE points into the source folder).
    tb = src / "cache" / "testbed" / TestbedConfig().digest()
    shutil.copytree(model, tb)
    (tb / "testbed.json").write_text(json.dumps({"params": 1, "held_out_loss": 1.0}))
    for name in ("calibration.txt", "eval.txt"):
        (tb / name).write_text(TEXT)
    paths["TB"] = tb
    paths["CACHE"] = src / "cache"
    shared = shared_dir()
    if shared is not None and (shared / "models" / "stories260K" / "stories260K.bin").is_file():
        paths["L"] = src / "l2c"
        paths["L"].mkdir()
        for name in ("stories260K.bin", "tok512.bin"):
            shutil.copyfile(shared / "models" / "stories260K" / name, paths["L"] / name)
    # Inputs of the rel-a rows.
    paths["LATIN1"] = src / "data" / "latin1.jsonl"
    paths["LATIN1"].write_bytes(json.dumps({"text": "caf\u00e9 " * 50}, ensure_ascii=False).encode("latin-1") + b"\n")
    paths["PICKLE"] = src / "pickle-model"
    _save_model(paths["PICKLE"])
    import torch
    from safetensors.torch import load_file

    weights = load_file(paths["PICKLE"] / "model.safetensors")
    (paths["PICKLE"] / "model.safetensors").unlink()
    torch.save(weights, paths["PICKLE"] / "pytorch_model.bin")
    paths["BIGCFG"] = src / "big-config"
    _save_model(paths["BIGCFG"])
    cfg = json.loads((paths["BIGCFG"] / "config.json").read_text())
    cfg["num_hidden_layers"] = 8
    (paths["BIGCFG"] / "config.json").write_text(json.dumps(cfg))
    scores32 = json.loads(paths["S"].read_text())
    scores32["n_layers"] = 32
    scores32["scores"] = {m: {f"block.{i}": float(i) for i in range(32)} for m in scores32["scores"]}
    scores32["stderr"] = {}
    paths["S32"] = src / "scores-32.json"
    paths["S32"].write_text(json.dumps(scores32))
    return paths


def _argv(row: Row, paths: dict[str, Path], w: Path) -> list[str]:
    values = {k: str(v) for k, v in paths.items()} | {"W": str(w)}
    return row.args.format(**values).split()


def _run_inproc(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(["-q", *argv])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - an escaped exception is what the row reports
        print(traceback.format_exc(), file=sys.stderr)
        code = 1
    return code, capsys.readouterr().err


def _run_subprocess(row: Row, argv: list[str]) -> tuple[int, str]:
    prefix: list[str] = []
    preexec = None
    if row.mode == "readonly" and os.geteuid() == 0:
        # Root writes anywhere; drop the capabilities that let it.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a folder read-only")
        caps = "-dac_override,-dac_read_search,-fowner"
        prefix = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    if row.mode == "fsize":
        def preexec() -> None:
            # As `ulimit -f 1`: no file may grow past 1 KiB (the outputs here are larger).
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **row.env}
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "depthprune", "-q", *argv],
        capture_output=True, text=True, env=env, preexec_fn=preexec, timeout=300, check=False,
    )
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    "row",
    [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else []) for r in ROWS],
)
def test_bad_input(
    row: Row, world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for need in row.needs:
        if need not in world:
            pytest.skip(f"needs {need} (from ../shared)")
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(world["CACHE"]))
    w = tmp_path / "w"
    w.mkdir()
    if row.setup is not None:
        row.setup(w)
    src_before, w_before = _tree_hash(world["SRC"]), _tree_hash(w)
    argv = _argv(row, world, w)
    try:
        if row.mode == "inproc":
            code, err = _run_inproc(argv, capsys)
        else:
            code, err = _run_subprocess(row, argv)
    finally:
        if (w / "ro").exists():
            (w / "ro").chmod(0o755)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("depthprune: error: "), lines[0]
    assert row.needle in lines[0], lines[0]
    assert _tree_hash(w) == w_before, "output or temporary files left behind"
    assert _tree_hash(world["SRC"]) == src_before, "the source folder changed"


def test_battery_is_large_enough() -> None:
    """The issue asks for at least 40 bad inputs over every subcommand."""
    assert len(ROWS) >= 40
    commands = {r.args.split()[0] for r in ROWS}
    expected = {"convert-llama2c", "convert-gguf", "score", "shapley", "iterative", "plan", "prune",
                "recover-compare", "eval", "sweep", "run", "demo", "testbed"}
    assert expected <= commands, expected - commands
    assert len({r.id for r in ROWS}) == len(ROWS)
