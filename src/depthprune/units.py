"""Units of a decoder model and the masking context manager.

A unit is a part of the model that adds an update to the residual stream:

- ``block.i``: decoder layer ``i`` as a whole,
- ``attn.i``: layer ``i``'s attention path (its norms, attention and residual add),
- ``mlp.i``: layer ``i``'s feed-forward path.

Indices always refer to the original model. Masking a unit makes its update zero by
swapping the path's module for a no-op; a block is masked by masking both of its paths.
A masked attention still writes a one-element-wide placeholder into the KV cache so that
the cache's sequence length, and so the positions and masks of later calls, stay right
with ``use_cache``, ``generate()`` and chunked prefill.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from depthprune.architectures import ArchSpec, get_submodule, spec_for_config
from depthprune.errors import InputError, check_choice
from depthprune.stream import ResidualStream, hidden_arg

UnitKind = Literal["block", "attn", "mlp"]
UNIT_KINDS: tuple[UnitKind, ...] = ("block", "attn", "mlp")
SUBLAYER_KINDS: tuple[Literal["attn", "mlp"], ...] = ("attn", "mlp")
_UNIT_RE = re.compile(r"^([A-Za-z_]+)\.(-?\d+)$")


@dataclass(frozen=True, order=True)
class Unit:
    """One unit, named ``kind.index`` with the index in the original model."""

    kind: UnitKind
    index: int

    def __str__(self) -> str:
        return f"{self.kind}.{self.index}"

    def sublayers(self) -> tuple[Unit, ...]:
        """The sublayer units that make up this unit (itself for a sublayer)."""
        if self.kind == "block":
            return (Unit("attn", self.index), Unit("mlp", self.index))
        return (self,)

    @classmethod
    def parse(cls, name: str, n_layers: int | None = None) -> Unit:
        """Parse ``"block.3"``-style names, checking the index when ``n_layers`` is given.

        Raises:
            InputError: the name is malformed, the kind unknown, or the index out of range.
        """
        text = name.strip()
        match = _UNIT_RE.match(text)
        if not match:
            raise InputError(
                f"unknown unit name {name!r}; expected KIND.INDEX with KIND one of "
                f"{', '.join(UNIT_KINDS)} (e.g. block.3, attn.0)"
            )
        kind, index = match.group(1), int(match.group(2))
        check_choice(kind, UNIT_KINDS, "unit kind", f" in {name!r}")
        if n_layers is not None and not 0 <= index < n_layers:
            raise InputError(
                f"unit {text!r} is out of range: the model has {n_layers} layers (indices 0..{n_layers - 1})"
            )
        return cls(kind, index)  # type: ignore[arg-type]


def parse_units(spec: str | Iterable[str | Unit], n_layers: int | None = None) -> list[Unit]:
    """Parse a comma-separated string or an iterable of names into sorted, unique units."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    units = {u if isinstance(u, Unit) else Unit.parse(u, n_layers) for u in items if str(u).strip()}
    if not units:
        raise InputError("no units given; expected names such as block.3,attn.5")
    return sorted(units)


def all_units(n_layers: int, kinds: Iterable[str] = UNIT_KINDS) -> list[Unit]:
    """Every unit of the given kinds in a model of ``n_layers`` layers, layer by layer."""
    kinds = tuple(kinds)
    for kind in kinds:
        check_choice(kind, UNIT_KINDS, "unit kind")
    return [Unit(k, i) for i in range(n_layers) for k in UNIT_KINDS if k in kinds]  # type: ignore[arg-type]


def expand_sublayers(units: Iterable[Unit]) -> set[Unit]:
    """The set of sublayer units covered by ``units`` (a block covers its two sublayers)."""
    return {s for u in units for s in u.sublayers()}


class NoOpAttention(nn.Module):
    """Stands in for an attention module: returns a zero update and keeps the cache length.

    Args:
        layer_index: The index under which the layer writes to the KV cache.
        cache_arg: Keyword under which the decoder layer passes the cache.
    """

    def __init__(self, layer_index: int, cache_arg: str) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.cache_arg = cache_arg

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        hidden = hidden_arg(args, kwargs)  # (B, T, D)
        cache = kwargs.get(self.cache_arg)
        if cache is not None:
            # A (B, 1, T, 1) placeholder: the cache advances by T tokens for this layer at
            # almost no memory cost. Nothing reads it, since this layer attends to nothing.
            placeholder = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_index)
        return torch.zeros_like(hidden), None

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}"


class NoOpMLP(nn.Module):
    """Stands in for an MLP module: returns a zero update."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden)  # (B, T, D)


@dataclass(frozen=True)
class ModelLayout:
    """A model together with its architecture spec, for unit-level access."""

    model: nn.Module
    spec: ArchSpec

    @classmethod
    def of(cls, model: nn.Module, spec: ArchSpec | None = None) -> ModelLayout:
        return cls(model, spec or spec_for_config(model.config))

    @property
    def layers(self) -> nn.ModuleList:
        return get_submodule(self.model, self.spec.layers)  # type: ignore[return-value]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def stream(self) -> ResidualStream:
        """Where each path of this model's layers reads and writes the residual stream."""
        return ResidualStream.of(self.spec, self.model.config)

    @property
    def parallel(self) -> bool:
        return self.stream.parallel

    def sublayer_module(self, unit: Unit) -> nn.Module:
        """The module that computes a sublayer unit's update (before any post-norms)."""
        return get_submodule(self.layers[unit.index], self.spec.path(unit.kind).module)

    def check_units(self, units: Iterable[Unit]) -> None:
        for u in units:
            if not 0 <= u.index < self.n_layers:
                raise InputError(
                    f"unit {u} is out of range: the model has {self.n_layers} layers (indices 0..{self.n_layers - 1})"
                )


def _swap(root: nn.Module, dotted: str, new: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """Put ``new`` at ``root``'s dotted path; return (parent, name, old) to undo it."""
    prefix, _, name = dotted.rpartition(".")
    parent = get_submodule(root, prefix) if prefix else root
    old = get_submodule(parent, name)
    parent._modules[name] = new
    return parent, name, old


@contextlib.contextmanager
def mask_units(
    model: nn.Module,
    units: Iterable[Unit | str],
    spec: ArchSpec | None = None,
    replacements: Mapping[Unit, nn.Module] | None = None,
) -> Iterator[None]:
    """Disable ``units`` inside the ``with`` block; restore the model exactly on exit.

    Args:
        model: A Hugging Face causal LM of a supported family.
        units: Units to disable (``block.i`` disables both sublayers of layer ``i``).
        spec: The family spec; looked up from ``model.config`` when omitted.
        replacements: Optional modules that stand in for individual sublayer units instead
            of the zero no-op (used by recovery to emulate removed units).

    The original modules are put back by identity, so outputs after the block are bitwise
    identical to before it.
    """
    layout = ModelLayout.of(model, spec)
    parsed = [u if isinstance(u, Unit) else Unit.parse(u, layout.n_layers) for u in units]
    layout.check_units(parsed)
    replacements = dict(replacements or {})
    restore: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for unit in sorted(expand_sublayers(parsed)):
            layer = layout.layers[unit.index]
            path = layout.spec.path(unit.kind)
            new = replacements.get(unit)
            if new is None:
                new = NoOpAttention(unit.index, path.cache_arg or "") if unit.kind == "attn" else NoOpMLP()
            restore.append(_swap(layer, path.module, new))
        yield
    finally:
        for parent, name, old in reversed(restore):
            parent._modules[name] = old
