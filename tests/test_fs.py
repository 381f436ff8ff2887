"""The one write path (depthprune._fs): temporary names, leftovers, no-replace commits,
OS errors and the source-folder check (issue 13, classes 3, 4 and 8)."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from depthprune import _fs
from depthprune.errors import InputError, OutputExistsError, WriteError

SRC = Path(__file__).resolve().parents[1] / "src"


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_leftovers_of_dead_processes_are_removed_before_writing(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getpid()
    stale_dir = tmp_path / f".out.tmp-{dead}-abc"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    stale_old = tmp_path / f".out.old-{dead}-q"
    stale_old.mkdir()
    running = tmp_path / f".out.tmp-{live}-other"  # a write of this (running) process
    running.mkdir()
    foreign = tmp_path / f".other.tmp-{dead}-z"  # another output's
    foreign.mkdir()
    with _fs.atomic_dir(tmp_path / "out") as tmp:
        assert re.fullmatch(rf"\.out\.tmp-{live}-.+", tmp.name), tmp.name
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert not stale_dir.exists() and not stale_old.exists()
    assert running.exists() and foreign.exists()


def test_temporary_file_names_carry_the_pid(tmp_path: Path) -> None:
    with _fs.atomic_file(tmp_path / "fig.png") as tmp:
        assert re.fullmatch(rf"\.fig\.png\.tmp-{os.getpid()}-.+\.png", tmp.name), tmp.name
        tmp.write_bytes(b"png")
    assert (tmp_path / "fig.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_commit_does_not_replace_an_output_that_appeared_meanwhile(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while it was being written"):
        if kind == "dir":
            with _fs.atomic_dir(out) as tmp:
                (tmp / "mine.txt").write_text("mine")
                out.mkdir()  # another process finished first
                (out / "theirs.txt").write_text("theirs")
        else:
            with _fs.atomic_file(out, force=False) as tmp:
                tmp.write_text("mine")
                out.write_text("theirs")
    theirs = out / "theirs.txt" if kind == "dir" else out
    assert theirs.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_a_folder_and_leaves_no_old_copy(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with _fs.atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_RACER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import depthprune._fs as fs

    barrier = Path(sys.argv[1])
    commit = fs._commit

    def commit_together(tmp, target, force):
        # Both writers have passed the early check; commit at the same moment.
        (barrier / f"ready-{os.getpid()}").touch()
        while len(list(barrier.glob("ready-*"))) < 2:
            time.sleep(0.005)
        commit(tmp, target, force)

    fs._commit = commit_together
    from depthprune.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def test_two_concurrent_writers_exactly_one_wins(tmp_path: Path) -> None:
    """Two `plan` runs onto the same -o, released together at the final rename: one
    writes, the other exits 2 with one line and leaves nothing; the winner's file stays."""
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"model": "m", "n_layers": 4, "scores": {"cosine": {f"block.{i}": i / 10 for i in range(4)}}}))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    out = work / "plan.json"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argv = [str(barrier), "-q", "plan", str(scores), "--metric", "cosine", "--remove", "1", "-o", str(out)]
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, *argv], env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "appeared while it was being written" in loser, loser
    assert json.loads(out.read_text())["remove"][0]["unit"] == "block.0"
    assert sorted(p.name for p in work.iterdir()) == ["plan.json"]


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteError, match="no space left on the device"):
        _fs.write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_safetensors_io_error_is_a_write_error(tmp_path: Path) -> None:
    class SafetensorError(Exception):  # safetensors' Rust error, by name
        pass

    with pytest.raises(WriteError, match="file size limit"), _fs.atomic_dir(tmp_path / "m") as tmp:
        (tmp / "w").write_text("x")
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    assert list(tmp_path.iterdir()) == []


def test_source_check_resolves_symlinks(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(model)
    for out, source in ((link / "x.json", model), (model / "x.json", link), (tmp_path, link)):
        with pytest.raises(InputError, match="source model"):
            _fs.check_target(out, models=[source])
    gguf = tmp_path / "g" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    # A model file is only itself: the file, or a folder holding it, is refused (through a
    # link too); a file beside it is not part of the model (`convert-gguf x.gguf -o x-hf`).
    glink = tmp_path / "glink.gguf"
    glink.symlink_to(gguf)
    for out in (gguf, gguf.parent, tmp_path):
        with pytest.raises(InputError, match="source model"):
            _fs.check_target(out, models=[glink])
    _fs.check_target(gguf.parent / "scores.json", "file", models=[gguf])
    _fs.check_target(tmp_path / "elsewhere.json", "file", models=[model, gguf, "org/hub-id"])


def test_no_fixed_temporary_names_outside_fs() -> None:
    """Temporary names and renames live in _fs only, so every one is per process and
    cleaned; a fixed name such as `.sweep_x.tmp.png` once made two runs collide."""
    pattern = re.compile(r"os\.replace\(|os\.rename\(|tempfile\.mk|\.tmp[\"'.]|\.tmp\b\"")
    offenders = []
    for path in (SRC / "depthprune").rglob("*.py"):
        if path.name == "_fs.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert offenders == []
