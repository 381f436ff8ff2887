"""Progress bars for long work: shown on a terminal, hidden otherwise."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, disable: bool = False) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar that hides itself when stderr is not a terminal.

    Args:
        items: What to iterate over.
        desc: Short label of the work.
        total: Number of items, when ``items`` has no ``len``.
        disable: Hide the bar even on a terminal (``--quiet``).
    """
    # disable=None is tqdm's "only on a TTY".
    yield from tqdm(items, desc=desc, total=total, disable=True if disable else None, leave=False, dynamic_ncols=True)


def counter(total: int, desc: str, disable: bool = False) -> tqdm:
    """A progress bar advanced by hand with ``.update()``; use it as a context manager."""
    return tqdm(total=total, desc=desc, disable=True if disable else None, leave=False, dynamic_ncols=True)
