"""The emulator modules that stand in for removed units, and the ``replace`` values naming them.

- :class:`BiasEmulator` (``bias``): ``dh = b``;
- :class:`LowRankEmulator` (``lowrank:R``): ``dh = b + (h - mu) A B`` of the stream ``h``
  entering the unit;
- :class:`LinearEmulator` (``linear:R``, ``linear:full``): ``dh = y A B`` of the output
  ``y`` of the last kept writer before the unit.

How they are fitted is :mod:`depthprune.recover.emulate`; how they are placed,
:mod:`depthprune.recover.install`; how bias and linear ones fold into weights,
:mod:`depthprune.recover.fold`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from depthprune.errors import InputError
from depthprune.units import StreamBox

REPLACE_HELP = "none, bias, lowrank:R or linear:R (R a positive integer, or linear:full)"
REPLACE_RE = re.compile(r"^(none|bias|lowrank:([1-9][0-9]*)|linear:([1-9][0-9]*|full))$")


# --------------------------------------------------------------------------- modules


class BiasEmulator(nn.Module):
    """Emulates an update by a constant: ``dh = b``.

    Args:
        bias: ``(D,)``.
    """

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    @classmethod
    def empty(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> BiasEmulator:
        """A zero emulator of width ``dim`` (to be trained, or filled from a checkpoint)."""
        return cls(torch.zeros(dim, dtype=dtype, device=device))

    @property
    def rank(self) -> int:
        return 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h) + self.bias.to(h.dtype)  # (B, T, D)

    def extra_repr(self) -> str:
        return f"dim={self.bias.shape[0]}"


class LowRankEmulator(nn.Module):
    """Emulates an update by a rank-``r`` affine map: ``dh = b + (h - mu) A B``.

    Args:
        mu: ``(D,)`` input centre.
        A: ``(D, r)``.
        B: ``(r, D)``.
        b: ``(D,)`` bias.
    """

    def __init__(self, mu: torch.Tensor, A: torch.Tensor, B: torch.Tensor, b: torch.Tensor) -> None:  # noqa: N803
        super().__init__()
        d, r = A.shape
        if mu.shape != (d,) or B.shape != (r, d) or b.shape != (d,):
            raise InputError(
                f"low-rank emulator shapes disagree: mu {tuple(mu.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                f"b {tuple(b.shape)}; expected (D,), (D, r), (r, D), (D,)"
            )
        self.mu = nn.Parameter(mu.detach().clone())
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        self.bias = nn.Parameter(b.detach().clone())

    @classmethod
    def empty(cls, dim: int, rank: int, dtype: torch.dtype | None = None, device: Any = None) -> LowRankEmulator:
        """A zero emulator (to be trained, or filled from a checkpoint)."""
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(z(dim), z(dim, rank), z(rank, dim), z(dim))

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.A.dtype) - self.mu  # (B, T, D)
        return (x @ self.A) @ self.B + self.bias  # (B, T, r) -> (B, T, D)

    def extra_repr(self) -> str:
        return f"dim={self.A.shape[0]}, rank={self.rank}"


class LinearEmulator(nn.Module):
    """Emulates an update by a rank-``r`` linear map of another writer's output: ``dh = y A B``.

    ``y`` is the output of the last kept writer of the residual stream before the removed
    unit (:meth:`depthprune.stream.ResidualStream.writer_before`: a kept attention or MLP
    path, or the token embeddings), not the stream itself. That writer's output then
    becomes ``y (I + A B)``, which folds into its output projection (ReplaceMe, Shumaylov
    et al. 2025): see :mod:`depthprune.recover.fold`. The input ``h`` that the unit's slot
    passes is ignored; :func:`depthprune.recover.install.install_` hooks the writer and
    hands ``y`` over through :attr:`tap`.

    Args:
        A: ``(D, r)``.
        B: ``(r, D)``.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:  # noqa: N803
        super().__init__()
        d, r = A.shape
        if B.shape != (r, d):
            raise InputError(f"linear emulator shapes disagree: A {tuple(A.shape)}, B {tuple(B.shape)}; expected (D, r), (r, D)")
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        self.tap = StreamBox()

    @classmethod
    def empty(cls, dim: int, rank: int, dtype: torch.dtype | None = None, device: Any = None) -> LinearEmulator:
        """A zero emulator (to be filled from a checkpoint)."""
        return cls(torch.zeros(dim, rank, dtype=dtype, device=device), torch.zeros(rank, dim, dtype=dtype, device=device))

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    def matrix(self) -> torch.Tensor:
        """``A B``, float64 ``(D, D)``: the writer's output ``y`` becomes ``y (I + A B)``."""
        return self.A.detach().double() @ self.B.detach().double()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.tap.take().to(self.A.dtype)  # (B, T, D): the writer's output, not h
        return (y @ self.A) @ self.B  # (B, T, r) -> (B, T, D)

    def extra_repr(self) -> str:
        return f"dim={self.A.shape[0]}, rank={self.rank}"


def parse_replace(value: str) -> tuple[str, int]:
    """``"none"`` -> ``("none", 0)``, ``"bias"`` -> ``("bias", 0)``, ``"lowrank:8"`` -> ``("lowrank", 8)``,
    ``"linear:8"`` -> ``("linear", 8)``, ``"linear:full"`` -> ``("linear", 0)`` (0: the model's width).

    Raises:
        InputError: anything else.
    """
    match = REPLACE_RE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise InputError(f"unknown replacement {value!r}; expected {REPLACE_HELP}")
    kind = match.group(1).split(":")[0]
    rank = match.group(2) or match.group(3) or "0"
    return kind, 0 if rank == "full" else int(rank)


def parse_stand_in(value: str) -> tuple[str, int]:
    """:func:`parse_replace` for places that stand in for units one at a time, in place.

    A linear emulator reads the writer before a whole run of removed units, so it is
    fitted per removal set; only ``prune --recover`` offers it.

    Raises:
        InputError: an unknown value, or ``linear:R``.
    """
    kind, rank = parse_replace(value)
    if kind == "linear":
        raise InputError(
            f"{value!r} is not available here: a linear emulator depends on the whole set of removed units, so only "
            "`depthprune prune --recover linear:R` fits it; use none, bias or lowrank:R"
        )
    return kind, rank


def empty_emulator(replace: str, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> nn.Module | None:
    """An untrained emulator for a ``replace`` value (``None`` for ``none``)."""
    kind, rank = parse_replace(replace)
    if kind == "none":
        return None
    if kind == "bias":
        return BiasEmulator.empty(dim, dtype, device)
    if kind == "linear":
        return LinearEmulator.empty(dim, rank or dim, dtype, device)
    return LowRankEmulator.empty(dim, rank, dtype, device)


def describe(emulator: nn.Module | None) -> str:
    """The ``replace`` value that an emulator module implements."""
    if emulator is None:
        return "none"
    if isinstance(emulator, BiasEmulator):
        return "bias"
    if isinstance(emulator, LowRankEmulator):
        return f"lowrank:{emulator.rank}"
    if isinstance(emulator, LinearEmulator):
        return f"linear:{emulator.rank}"
    raise InputError(
        f"{type(emulator).__name__} is not a depthprune emulator; expected BiasEmulator, LowRankEmulator or LinearEmulator"
    )
