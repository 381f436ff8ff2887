"""Activations kept in memory up to a budget, and spilled to a temporary folder beyond it.

Spilled tensors are written with safetensors (one file per tensor) and read back with
safetensors; nothing is pickled. The folder is a ``tempfile.TemporaryDirectory``, removed
when the store is closed, also after an error or a ``KeyboardInterrupt``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Hashable
from pathlib import Path
from types import TracebackType
from typing import Self

import torch

from depthprune.errors import InputError

logger = logging.getLogger(__name__)


class SpillSpaceError(InputError):
    """The disk holding the spill folder has too little free space."""


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ActivationStore:
    """A dict of tensors that holds at most ``budget`` bytes in memory and spills the rest.

    Use it as a context manager; tensors put after the budget is full go to disk, and
    come back (as new tensors on ``device``) when taken.

    Args:
        budget: Bytes of tensors to keep in memory; ``None`` for no limit.
        folder: Where to make the temporary spill folder (default: the system's).
        device: Where tensors read back from disk go.
    """

    def __init__(self, budget: int | None, folder: str | None = None, device: torch.device | str = "cpu") -> None:
        self.budget = budget
        self.device = torch.device(device)
        self._parent = folder
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._memory: dict[Hashable, torch.Tensor] = {}
        self._disk: dict[Hashable, Path] = {}
        self._names = 0
        self.resident = 0
        self.spilled_bytes = 0  # bytes written to disk in all

    # -- lifetime ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Drop every tensor and remove the spill folder."""
        self._memory.clear()
        self._disk.clear()
        self.resident = 0
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def folder(self) -> Path | None:
        """The spill folder, once something was spilled (``None`` before and after)."""
        return Path(self._tmp.name) if self._tmp is not None else None

    # -- tensors ---------------------------------------------------------------------------

    def __contains__(self, key: Hashable) -> bool:
        return key in self._memory or key in self._disk

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        """Store ``value`` under ``key`` (replacing any previous one)."""
        self.drop(key)
        size = tensor_bytes(value)
        if self.budget is None or self.resident + size <= self.budget:
            self._memory[key] = value
            self.resident += size
            return
        self._spill(key, value, size)

    def take(self, key: Hashable) -> torch.Tensor:
        """The tensor under ``key``, removed from the store."""
        value = self.get(key)
        self.drop(key)
        return value

    def get(self, key: Hashable) -> torch.Tensor:
        """The tensor under ``key`` (read back from disk when it was spilled)."""
        if key in self._memory:
            return self._memory[key]
        from safetensors.torch import load_file

        return load_file(str(self._disk[key]), device=str(self.device))["t"]

    def drop(self, key: Hashable) -> None:
        """Forget ``key`` (deleting its file when it was spilled)."""
        if key in self._memory:
            self.resident -= tensor_bytes(self._memory.pop(key))
        elif key in self._disk:
            self._disk.pop(key).unlink(missing_ok=True)

    def _spill(self, key: Hashable, value: torch.Tensor, size: int) -> None:
        from safetensors.torch import save_file

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="depthprune-spill-", dir=self._parent)
            logger.info("activations beyond %d bytes spill to %s", self.budget, self._tmp.name)
        folder = Path(self._tmp.name)
        free = shutil.disk_usage(folder).free
        if free < size + (64 << 20):  # keep some room for everyone else
            raise SpillSpaceError(
                f"the spill folder {folder} has {free:,} bytes free, too little for {size:,} more bytes of activations; "
                "free disk space, set TMPDIR to a larger disk, or raise --stream-budget"
            )
        path = folder / f"{self._names}.safetensors"
        self._names += 1
        save_file({"t": value.detach().contiguous().cpu()}, str(path))
        self._disk[key] = path
        self.spilled_bytes += size
