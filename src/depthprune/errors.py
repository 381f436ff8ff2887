"""Error types. Every error that a user can cause derives from :class:`DepthPruneError`.

The CLI turns any of them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar

V = TypeVar("V")


class DepthPruneError(Exception):
    """Base class of every error that depthprune raises on bad input."""


class InputError(DepthPruneError, ValueError):
    """A value given by the user is malformed or out of range."""


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


def lookup(registry: Mapping[str, V], name: str, what: str) -> V:
    """``registry[name]``, or an :class:`InputError` that suggests the closest name.

    The message reads ``unknown {what} 'x'. Did you mean: y? Available: ...``.
    """
    try:
        return registry[name]
    except KeyError:
        raise InputError(
            f"unknown {what} {name!r}.{did_you_mean(str(name), registry)} Available: {', '.join(registry)}"
        ) from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
