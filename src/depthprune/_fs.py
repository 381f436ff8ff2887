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
    if path.exists() and not force:
        raise OutputExistsError(f"output {str(path)!r} already exists; pass --force to overwrite it")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise InputError(f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    return path


def check_free_disk(folder: str | os.PathLike[str], needed: int, hint: str) -> None:
    """Refuse an export of about ``needed`` bytes that the disk holding ``folder`` cannot take.

    Raises:
        InputError: fewer than ``needed`` bytes are free there; the message ends with ``hint``.
    """
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise InputError(
            f"the export needs about {needed / 2**30:.2f} GiB but {str(folder)!r} has {free / 2**30:.2f} GiB free; "
            f"free some space or {hint}"
        )


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only if the block succeeds.

    The temporary folder is a sibling of ``out`` so the final rename stays on one file
    system. On any error it is removed and ``out`` is left untouched.
    """
    path = check_output(out, force)
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
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    target = check_output(path, force)
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
