"""Atomic writing of output folders and files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from depthprune.distributed import is_writer
from depthprune.errors import CheckpointError, InputError, OutputExistsError


def check_output(out: str | os.PathLike[str], force: bool) -> Path:
    """Validate an output path before any work starts.

    Args:
        out: The file or folder to be written.
        force: Whether an existing output may be replaced.

    Returns:
        The output as a ``Path``.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is false.
        InputError: the parent folder of ``out`` does not exist.
    """
    path = Path(out)
    # Under torchrun rank 0 alone checks: it may already have written ``out`` when a rank
    # that runs no collective before writing (plan, prune) gets here.
    if path.exists() and not force and is_writer():
        raise OutputExistsError(f"output {str(path)!r} already exists; pass --force to overwrite it")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise InputError(f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    return path


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only if the block succeeds.

    The temporary folder is a sibling of ``out`` so the final rename stays on one file
    system. On any error it is removed and ``out`` is left untouched. Under torchrun only
    rank 0 replaces ``out``: other ranks get a scratch folder that is deleted afterwards.
    """
    path = check_output(out, force)
    if not is_writer():
        with tempfile.TemporaryDirectory(prefix="depthprune-rank-") as scratch:
            yield Path(scratch)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.absolute().parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(root: Path) -> None:
    """Give a finished temporary file or tree the permissions of normally created files.

    ``mkdtemp`` and some writers create owner-only files; an exported model is meant to
    be read by others, as any file the user creates would be.
    """
    umask = os.umask(0)
    os.umask(umask)
    root.chmod((0o777 if root.is_dir() else 0o666) & ~umask)
    for p in root.rglob("*") if root.is_dir() else ():
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def write_json_atomic(path: str | os.PathLike[str], data: Any, force: bool = True) -> Path:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename.

    Under torchrun only rank 0 writes; other ranks return ``path`` untouched.
    """
    target = check_output(path, force)
    if not is_writer():
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.absolute().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
        _apply_umask(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def read_checkpoint(path: Path, kind: str, what: str, hint: str) -> dict[str, Any]:
    """Read a checkpoint that depthprune wrote, checking that it is one of ``kind``.

    Args:
        path: The checkpoint file.
        kind: The ``"kind"`` its writer recorded.
        what: What it is, for messages (``"Shapley checkpoint"``).
        hint: How to give another one, appended when it is of another kind.

    Raises:
        CheckpointError: the file is not JSON, or not a checkpoint of ``kind``.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not valid JSON ({exc}); delete it to start over") from None
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise CheckpointError(f"{str(path)!r} is not a depthprune {what}; {hint}")
    return doc


def read_json(path: str | os.PathLike[str], what: str, hint: str) -> Any:
    """Read a JSON file that a person gives, with errors that name it.

    Args:
        path: The file.
        what: What the file is, for messages (``"plan file"``).
        hint: How to get a good one, appended when the file is missing.

    Raises:
        InputError: the file is missing, a folder, not UTF-8 or not valid JSON.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {str(p)!r} does not exist; {hint}")
    if not p.is_file():
        raise InputError(f"{what} {str(p)!r} is not a file; {hint}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} {str(p)!r} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {str(p)!r} is not UTF-8 text; expected a JSON file") from None
