"""Bad input: one line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from depthprune.cli import build_parser, main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("depthprune: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".out")] == []


def test_missing_path(capsys: pytest.CaptureFixture[str], out: Path) -> None:
    code, err = _run(["prune", str(out.parent / "no-such-model"), "--remove", "block.0", "-o", str(out)], capsys)
    _assert_one_line_error(code, err, "does not exist")
    _nothing_written(out)


def test_folder_that_is_not_a_model(capsys: pytest.CaptureFixture[str], tmp_path: Path, out: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    code, err = _run(["prune", str(folder), "--remove", "block.0", "-o", str(out)], capsys)
    _assert_one_line_error(code, err, "not a Hugging Face model folder", "config.json")
    _nothing_written(out)


def test_unsupported_architecture(capsys: pytest.CaptureFixture[str], tmp_path: Path, out: Path) -> None:
    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    code, err = _run(["prune", str(folder), "--remove", "block.0", "-o", str(out)], capsys)
    _assert_one_line_error(code, err, "unsupported architecture 'MambaForCausalLM'", "llama", "gpt_neox", "DEPTHPRUNE_ARCH_PATH")
    _nothing_written(out)


@pytest.mark.parametrize(
    ("remove", "needles"),
    [
        ("blok.1", ("unknown unit kind 'blok'", "Did you mean: block?")),
        ("block.one", ("unknown unit name",)),
        ("block.4", ("out of range", "4 layers")),
        ("block.0,block.1,block.2,block.3", ("cannot remove every block",)),
        ("mlp.7", ("out of range", "4 layers")),
    ],
)
def test_bad_units(
    remove: str, needles: tuple[str, ...], tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str], out: Path
) -> None:
    code, err = _run(["prune", str(tiny_model_dirs["llama"]), "--remove", remove, "-o", str(out)], capsys)
    _assert_one_line_error(code, err, *needles)
    _nothing_written(out)


def test_truncated_checkpoint(shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], out: Path) -> None:
    src = shared / "models" / "stories260K"
    data = (src / "stories260K.bin").read_bytes()
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(data[: len(data) // 2])
    code, err = _run(["convert-llama2c", str(bad), str(src / "tok512.bin"), "-o", str(out)], capsys)
    _assert_one_line_error(code, err, "truncated.bin")
    _nothing_written(out)


def test_truncated_safetensors(tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], out: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in tiny_model_dirs["llama"].iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(data[: len(data) // 3] if f.suffix == ".safetensors" else data)
    code, err = _run(["prune", str(folder), "--remove", "block.0", "-o", str(out)], capsys)
    _assert_one_line_error(code, err, "cannot load the weights")
    _nothing_written(out)


def test_console_script_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "depthprune", "prune", str(tmp_path / "nope"), "--remove", "block.0", "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"depthprune: error: model path {str(tmp_path / 'nope')!r} does not exist; give a model folder or a Hub id such as org/name"
    ]
    assert proc.stdout == ""


def test_no_subcommand_shadows_a_global_flag() -> None:
    # A subcommand's own --quiet once overwrote the global -q with its default (False).
    parser = build_parser()
    global_dests = {a.dest for a in parser._actions if not isinstance(a, (argparse._SubParsersAction, argparse._HelpAction))}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
        shadowed = global_dests & {a.dest for a in subparser._actions}
        assert not shadowed, f"`depthprune {name}` redefines global {sorted(shadowed)}"
