"""Data parallelism under ``torchrun``: which share of the data a rank takes, and summing.

``torchrun --nproc-per-node N -m depthprune score ...`` starts N copies of the CLI. Each
copy loads the model, takes its share of the calibration sequences (or evaluation
windows, or Shapley batches), and computes *sums*: loss sums and token counts, sums and
sums of squares of static metrics, the moment sums of emulator fits. :func:`all_reduce_sum`
adds them over ranks, and every rank then finishes the computation on the totals, so the
result equals the single-process one (up to the order of float64 additions). Means are
never averaged over ranks: ranks hold different numbers of tokens.

The CLI calls :func:`init_from_env` once; the process group is torch's, so library
functions ask :func:`world` for the rank instead of taking it as an argument. Without
``torchrun`` (no ``WORLD_SIZE`` > 1) :func:`world` is rank 0 of 1 and every helper here is
the identity. Only rank 0 writes outputs (:func:`is_writer`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

from depthprune.devices import HOST
from depthprune.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> World:
    """The current process group's shape; rank 0 of 1 when none is initialized."""
    if not _initialized():
        return World()
    return World(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    )


def is_writer() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return world().rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number") from None


@contextlib.contextmanager
def init_from_env(device: str = "cpu") -> Iterator[World]:
    """Join the process group torchrun describes in the environment, for the block's duration.

    The backend is ``nccl`` when ``device`` is a CUDA device, else ``gloo``. On CUDA each
    rank uses ``cuda:LOCAL_RANK``. Without ``WORLD_SIZE`` > 1 nothing happens.

    Yields:
        The :class:`World`.
    """
    if env_world_size() <= 1 or _initialized():
        yield world()
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    try:
        logger.info("rank %d of %d (%s)", torch.distributed.get_rank(), torch.distributed.get_world_size(), "nccl" if cuda else "gloo")
        yield world()
    finally:
        torch.distributed.destroy_process_group()


def rank_device(device: str) -> str:
    """The device a rank puts its model on: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if env_world_size() > 1 and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share(n: int) -> range:
    """The indices ``0..n-1`` this rank takes: a contiguous block, sizes differing by at most one."""
    w = world()
    return range(w.rank * n // w.size, (w.rank + 1) * n // w.size)


def strided(n: int) -> range:
    """Every ``size``-th index from ``rank``: for items sorted by cost (perplexity windows, batches)."""
    w = world()
    return range(w.rank, n, w.size)


def all_reduce_sum(values: Sequence[torch.Tensor | float | int]) -> list[torch.Tensor]:
    """Sum each value over ranks, in float64, in one collective call.

    Every rank must call this with the same number and shapes of values, in the same
    order. Tensors come back on their own devices; numbers come back as 0-d float64 CPU
    tensors. Integer counts up to 2**53 are exact.
    """
    tensors = [v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64, device=HOST) for v in values]
    if not _initialized() or world().size == 1:
        return [t.to(torch.float64) for t in tensors]
    comm = _comm_device()
    flat = torch.cat([t.detach().reshape(-1).to(comm, torch.float64) for t in tensors]) if tensors else None
    if flat is None:
        return []
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape).to(t.device))
        start += t.numel()
    return out


def check_same(what: str, text: str) -> None:
    """Refuse to go on when ranks disagree about ``text`` (a model name, a data hash).

    Raises:
        InputError: on every rank, when any two ranks hold different values.
    """
    if not _initialized() or world().size == 1:
        return
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:6], "big")  # < 2**53: exact in float64
    comm = _comm_device()
    low = torch.tensor([float(digest)], dtype=torch.float64, device=comm)
    high = low.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if low.item() != high.item():
        raise InputError(
            f"torchrun ranks disagree about the {what}: every rank must load the same model and data "
            "(check the paths and that the files are the same on every node)"
        )
