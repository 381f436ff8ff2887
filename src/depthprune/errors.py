"""Error types. Every error that a user can cause derives from :class:`DepthPruneError`.

The CLI turns any of them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TypeVar

V = TypeVar("V")


class DepthPruneError(Exception):
    """Base class of every error that depthprune raises on bad input."""


class InputError(DepthPruneError, ValueError):
    """A value given by the user is malformed or out of range."""


class UsageError(DepthPruneError, ValueError):
    """A command line that the argument parser refuses (unknown flag, bad number, ...)."""


class ModelLoadError(DepthPruneError, ValueError):
    """A model path or id could not be loaded as a decoder LLM."""


class UnsupportedArchitectureError(DepthPruneError, ValueError):
    """No architecture data file matches the model."""


class CheckpointError(DepthPruneError, ValueError):
    """A checkpoint file is truncated or malformed."""


class OutputExistsError(DepthPruneError, FileExistsError):
    """The output path exists and ``force`` was not given."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean: x?"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean: {close[0]}?" if close else ""


def unknown_choice(what: str, name: object, choices: Iterable[str], where: str = "") -> InputError:
    """The error for a value that is not one of ``choices``.

    The message reads ``unknown {what} 'x'{where}. Did you mean: y? Available: a, b``.
    """
    choices = [str(c) for c in choices]
    return InputError(
        f"unknown {what} {name!r}{where}.{did_you_mean(str(name), choices)} Available: {', '.join(choices) or 'none'}"
    )


def check_choice(name: V, choices: Iterable[str], what: str, where: str = "") -> V:
    """Return ``name`` when it is one of ``choices``, else raise :func:`unknown_choice`'s error."""
    choices = list(choices)
    if name not in choices:
        raise unknown_choice(what, name, choices, where)
    return name


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class WriteError(DepthPruneError):
    """An output could not be written: a read-only folder, a full disk, a file where a folder is expected."""
