"""Every write of an output: checks, temporary names, atomic commits and OS errors.

All outputs are written through this module, so that the promises hold in one place:

- an output never lies inside (or holds) a model folder or input file the command reads
  (:func:`check_target`);
- a file where a folder is expected, or the reverse, a missing parent, a read-only
  folder or a full disk end in one :class:`~depthprune.errors.WriteError` line, and
  the temporary files are removed (:func:`os_errors`);
- outputs are built under a temporary name ``.NAME.tmp-<pid>-<random>`` beside the
  target; leftovers of a process that no longer runs are removed before the next write
  (:func:`clean_stale`);
- the final rename never replaces an output that appeared meanwhile unless ``force``
  (a no-replace rename, :func:`_commit`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from depthprune.distributed import is_writer
from depthprune.errors import (
    CheckpointError,
    DepthPruneError,
    InputError,
    OutputExistsError,
    WriteError,
)

Kind = Literal["file", "dir"]
PathLike = str | os.PathLike[str]

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit was reached",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "a folder on the path does not exist",
    errno.ENAMETOOLONG: "the name is too long",
}


def _reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()


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
def os_errors(target: PathLike) -> Iterator[None]:
    """Turn an OS error (or safetensors' I/O error) raised while writing ``target`` into one
    :class:`~depthprune.errors.WriteError` line. depthprune's own errors pass through."""
    try:
        yield
    except DepthPruneError:
        raise
    except OSError as exc:
        raise WriteError(f"cannot write {str(target)!r}: {_reason(exc)}") from None
    except Exception as exc:
        # safetensors writes from Rust and reports a failed write as SafetensorError.
        if type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):
            match = re.search(r"os error (\d+)", str(exc))
            reason = _reason(OSError(int(match.group(1)), "")) if match else str(exc)
            raise WriteError(f"cannot write {str(target)!r}: {reason}") from None
        raise


def _local(path: PathLike) -> Path | None:
    """The resolved path of an existing local file or folder; ``None`` for a Hub id."""
    p = Path(path).expanduser()
    return p.resolve() if p.exists() else None


def _overlaps(out: Path, source: Path) -> bool:
    return out == source or source in out.parents or out in source.parents


def check_target(
    out: PathLike,
    kind: Kind | None = None,
    models: Iterable[PathLike | None] = (),
    inputs: Iterable[PathLike | None] = (),
) -> Path:
    """Check that ``out`` can be written, whether or not it exists (for outputs that resume).

    Args:
        out: The file or folder to be written.
        kind: ``"file"`` or ``"dir"``: an existing ``out`` of the other kind is refused,
            even with ``--force``, because replacing it would destroy something else.
        models: Models the command reads (folders, ``.gguf`` or other model files, or Hub
            ids, which are skipped). ``out`` may not be, lie inside or hold a model's
            folder; for a model file, ``out`` may not be the file or hold it (a file
            beside it is fine). Symlinks are resolved.
        inputs: Other files the command reads (a plan, data); ``out`` may not be one, nor,
            for a folder, hold one.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        InputError: ``out`` overlaps a model or an input, or its parent is missing.
        WriteError: ``out`` or its parent is of the wrong kind.
    """
    path = Path(out)
    resolved = path.expanduser().resolve()
    for model in models:
        src = _local(model) if model is not None else None
        if src is None:
            continue
        # A model folder is the model: nothing may be added to it. A model file (.gguf,
        # llama2.c) is only itself: a file beside it is not part of it, but an output over
        # it, or an output folder that would replace a folder holding it, is refused.
        hit = _overlaps(resolved, src) if src.is_dir() else (resolved == src or resolved in src.parents)
        if hit:
            raise InputError(
                f"refusing to write {str(path)!r}: it is, holds or lies inside the source model "
                f"{str(model)!r}, which is never written; choose another output path"
            )
    for item in inputs:
        src = _local(item) if item is not None else None
        # An output folder written as a whole (kind "dir") replaces what it holds.
        if src is not None and (resolved == src or (kind == "dir" and resolved in src.parents)):
            raise InputError(f"refusing to write {str(path)!r}: it would replace the input {str(item)!r}; choose another output path")
    parent = path.absolute().parent
    if not parent.exists():
        raise InputError(f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise WriteError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise WriteError(f"cannot write {str(path)!r}: it is a file, and a folder is expected here; choose another path")
    if kind == "file" and path.is_dir():
        raise WriteError(f"cannot write {str(path)!r}: it is a folder, and a file is expected here; choose another path")
    return path


def check_output(
    out: PathLike,
    force: bool,
    kind: Kind | None = None,
    models: Iterable[PathLike | None] = (),
    inputs: Iterable[PathLike | None] = (),
) -> Path:
    """Validate an output path before any work starts: :func:`check_target`, and that it
    does not exist unless ``force``.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is false.
        InputError, WriteError: see :func:`check_target`.
    """
    path = check_target(out, kind, models, inputs)
    # Under torchrun rank 0 alone checks: it may already have written ``out`` when a rank
    # that runs no collective before writing (plan, prune) gets here.
    if path.exists() and not force and is_writer():
        raise OutputExistsError(f"output {str(path)!r} already exists; pass --force to overwrite it")
    return path


# Temporary names: ".NAME.tmp-<pid>-<random>" (and ".NAME.old-<pid>-<random>" for a
# replaced output on its way out).
_TEMP = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^/]*$")


def _temp_prefix(target: Path, what: str = "tmp") -> str:
    return f".{target.name}.{what}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def temp_leftovers(target: PathLike) -> list[Path]:
    """depthprune's temporary files and folders of ``target`` in its folder, of any process."""
    path = Path(target).absolute()
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    out = []
    for p in entries:
        m = _TEMP.match(p.name)
        if m and m.group("name") == path.name:
            out.append(p)
    return out


def clean_stale(target: PathLike) -> list[Path]:
    """Remove the temporary files of ``target`` left by processes that no longer run (a
    killed write); those of running processes, this one included, stay.

    Returns:
        The paths removed.
    """
    removed = []
    for p in temp_leftovers(target):
        m = _TEMP.match(p.name)
        if m and not _alive(int(m.group("pid"))):
            _remove(p)
            removed.append(p)
    return removed


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically, failing with ``FileExistsError`` when ``dst`` exists."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    # Fallbacks where the file system has no no-replace rename: a hard link for a file
    # (fails if dst exists); for a folder, claim dst with mkdir, then rename onto the empty claim.
    if src.is_dir():
        os.mkdir(dst)
        try:
            os.rename(src, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(dst)
            raise
    else:
        os.link(src, dst)
        os.unlink(src)


def _commit(tmp: Path, target: Path, force: bool) -> None:
    """Move a finished temporary file or folder to ``target``."""
    if not force:
        try:
            _rename_noreplace(tmp, target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise OutputExistsError(
                    f"output {str(target)!r} appeared while it was being written (another process?); "
                    "pass --force to overwrite it"
                ) from None
            raise
        return
    if tmp.is_dir() and target.exists():
        # A folder cannot replace a non-empty folder in one rename: move the old one aside.
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "old"), dir=target.parent)) / "x"
        os.replace(target, old)
        os.replace(tmp, target)
        _remove(old.parent)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(
    out: PathLike, force: bool = False, models: Iterable[PathLike | None] = (), inputs: Iterable[PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block succeeds.

    The temporary folder is a sibling of ``out`` (one file system, so the final rename is
    atomic). On any error it is removed and ``out`` is left untouched; an ``OSError``
    becomes a one-line :class:`~depthprune.errors.WriteError`. Under torchrun only rank 0
    writes ``out``: other ranks get a scratch folder that is deleted afterwards.

    Raises:
        OutputExistsError: ``out`` exists, or appeared meanwhile, and ``force`` is false.
        InputError, WriteError: see :func:`check_target` and :func:`os_errors`.
    """
    path = check_output(out, force, "dir", models, inputs).absolute()

    def make_tmp() -> Path:
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))

    with _staged(out, path, force, make_tmp, lambda scratch: scratch) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(
    out: PathLike, force: bool = True, models: Iterable[PathLike | None] = (), inputs: Iterable[PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a temporary file path (with ``out``'s suffix) that becomes ``out`` only if the
    block succeeds; as :func:`atomic_dir`, for one file."""
    path = check_output(out, force, "file", models, inputs).absolute()

    def make_tmp() -> Path:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=path.suffix, dir=path.parent)
        os.close(fd)
        return Path(name)

    with _staged(out, path, force, make_tmp, lambda scratch: scratch / path.name) as tmp:
        yield tmp


@contextlib.contextmanager
def _staged(
    out: PathLike, path: Path, force: bool, make_tmp: Callable[[], Path], in_scratch: Callable[[Path], Path]
) -> Iterator[Path]:
    """The staging shared by :func:`atomic_dir` and :func:`atomic_file`.

    Removes this output's stale leftovers, yields a temporary sibling made by ``make_tmp``,
    and commits it to ``path`` (no-replace unless ``force``) when the block succeeds; on any
    error the temporary is removed and an ``OSError`` becomes a ``WriteError``. Under
    torchrun, ranks other than 0 get ``in_scratch(folder)`` in a scratch folder instead.
    """
    if not is_writer():  # under torchrun only rank 0 writes
        with tempfile.TemporaryDirectory(prefix="depthprune-rank-") as scratch:
            yield in_scratch(Path(scratch))
        return
    with os_errors(out):
        clean_stale(path)
        tmp = make_tmp()
    try:
        with os_errors(out):
            yield tmp
            _apply_umask(tmp)
            _commit(tmp, path, force)
    except BaseException:
        _remove(tmp)
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


def write_text_atomic(path: PathLike, text: str, force: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    with atomic_file(path, force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: PathLike, data: Any, force: bool = True) -> Path:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n", force)


def copy_file_atomic(src: PathLike, path: PathLike, force: bool = True) -> Path:
    """Copy ``src`` to ``path`` through a temporary file and a rename."""
    with atomic_file(path, force) as tmp:
        shutil.copyfile(src, tmp)
    return Path(path)


def make_dir(path: PathLike, models: Iterable[PathLike | None] = (), inputs: Iterable[PathLike | None] = ()) -> Path:
    """Create the output folder ``path`` if it is missing (its parent must exist), for
    outputs that fill a folder file by file and resume (run, sweep, findings).

    Raises:
        InputError, WriteError: see :func:`check_target`; an OS error as a WriteError.
    """
    p = check_target(path, "dir", models, inputs)
    with os_errors(p):
        p.mkdir(exist_ok=True)
    return p


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
