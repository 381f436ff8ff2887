"""Units of a decoder model, and the stand-ins that remove them.

A unit is a part of the model that adds an update to the residual stream:

- ``block.i``: decoder layer ``i`` as a whole,
- ``attn.i``: layer ``i``'s attention path (its norms, attention and residual add),
- ``mlp.i``: layer ``i``'s feed-forward path.

Indices always refer to the original model. One mechanism, :func:`swap_units_`, removes
units: it swaps each removed path's module for a slot that adds zero or an emulator's
update (:mod:`depthprune.stream` says which stream feeds it). :func:`mask_units` uses it
for a ``with`` block, :func:`depthprune.recover.install.install_` for emulators and
exports. A block is removed by removing both of its paths.

A masked attention still writes a one-element-wide placeholder into the KV cache so that
the cache's sequence length, and so the positions and masks of later calls, stay right
with ``use_cache``, ``generate()`` and chunked prefill.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
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


def parse_unit_list(spec: str | Iterable[str | Unit], n_layers: int | None = None) -> list[Unit]:
    """Parse a comma-separated string or an iterable of names into units, in the order given.

    Every list of units a person writes (``--remove``, ``--mask``, a recipe) is parsed here.

    Raises:
        InputError: no units, a malformed or out-of-range name, or a unit given twice.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    units: list[Unit] = []
    for item in items:
        if not str(item).strip():
            continue
        unit = item if isinstance(item, Unit) else Unit.parse(item, n_layers)
        if unit in units:
            raise InputError(f"unit {unit} is given twice; list each unit once")
        units.append(unit)
    if not units:
        raise InputError("no units given; expected names such as block.3,attn.5")
    return units


def parse_units(spec: str | Iterable[str | Unit], n_layers: int | None = None) -> list[Unit]:
    """Parse a comma-separated string or an iterable of names into sorted units.

    Raises:
        InputError: see :func:`parse_unit_list`.
    """
    return sorted(parse_unit_list(spec, n_layers))


def all_units(n_layers: int, kinds: Iterable[str] = UNIT_KINDS) -> list[Unit]:
    """Every unit of the given kinds in a model of ``n_layers`` layers, layer by layer."""
    kinds = tuple(kinds)
    for kind in kinds:
        check_choice(kind, UNIT_KINDS, "unit kind")
    return [Unit(k, i) for i in range(n_layers) for k in UNIT_KINDS if k in kinds]  # type: ignore[arg-type]


def expand_sublayers(units: Iterable[Unit]) -> set[Unit]:
    """The set of sublayer units covered by ``units`` (a block covers its two sublayers)."""
    return {s for u in units for s in u.sublayers()}


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

    def check_units(self, units: Iterable[Unit]) -> None:
        for u in units:
            if not 0 <= u.index < self.n_layers:
                raise InputError(
                    f"unit {u} is out of range: the model has {self.n_layers} layers (indices 0..{self.n_layers - 1})"
                )


# --------------------------------------------------------------------------- stand-ins


class StreamBox:
    """Holds the raw stream of the current forward pass between a hook and a slot.

    A plain object (not a module or a tensor attribute) so that ``copy.deepcopy`` of the
    model maps the hook's and the slot's references to the same copy.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def put(self, value: torch.Tensor) -> None:
        self.value = value

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("an emulated unit ran without the stream that feeds it; was its hook removed?")
        return value


def _release_cache_slot(cache: Any, index: int) -> None:
    """Turn ``cache``'s layer ``index`` into a ``DummyLayer`` that stores nothing."""
    from transformers.cache_utils import DummyLayer, DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise InputError(
            f"cache of type {type(cache).__name__} has no per-layer list; depthprune models need a transformers "
            "Cache (DynamicCache or StaticCache)"
        )
    if index < len(layers) and isinstance(layers[index], DummyLayer):
        return
    replicate = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
    while len(layers) <= index:
        layers.append(replicate())
    layers[index] = DummyLayer()


class _Slot(nn.Module):
    """Stands in for a removed path's module: returns ``emulator(h)``, or zero without one.

    ``h`` is the raw stream entering the path, handed over by a hook of
    :meth:`ResidualStream.on_input`, never the (possibly pre-normed) input of the slot.
    """

    def __init__(self, emulator: nn.Module | None = None) -> None:
        super().__init__()
        self.emulator = emulator
        self._box = StreamBox()

    def _update(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.emulator is None:
            return torch.zeros_like(hidden)  # (B, T, D)
        return self.emulator(self._box.take()).to(hidden.dtype)


class AttnSlot(_Slot):
    """Stands in for a removed attention module (or a removed block, in its attention slot).

    Args:
        layer_index: The layer's position in the decoder list, under which it uses the cache.
        cache_arg: Keyword under which the decoder layer passes the cache.
        emulator: Computes the update from the raw stream; ``None`` for a zero update.
        placeholder_cache: Write a ``(B, 1, T, 1)`` placeholder into the cache, so that its
            length stays right at almost no memory cost, instead of turning the layer's
            cache slot into transformers' ``DummyLayer`` (which the cache skips, but which
            needs some other layer that keeps attention to measure lengths from).
    """

    def __init__(
        self, layer_index: int, cache_arg: str, emulator: nn.Module | None = None, placeholder_cache: bool = False
    ) -> None:
        super().__init__(emulator)
        self.layer_index = layer_index
        self.cache_arg = cache_arg
        self.placeholder_cache = placeholder_cache

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        hidden = hidden_arg(args, kwargs)  # (B, T, D), possibly pre-normed
        cache = kwargs.get(self.cache_arg)
        if cache is not None:
            if self.placeholder_cache:
                # Nothing reads it, since this layer attends to nothing.
                placeholder = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
                cache.update(placeholder, placeholder, self.layer_index)
            else:
                _release_cache_slot(cache, self.layer_index)
        return self._update(hidden), None

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, cache={'placeholder' if self.placeholder_cache else 'none'}"


class MlpSlot(_Slot):
    """Stands in for a removed MLP module.

    Args:
        emulator: Computes the update from the raw stream; ``None`` for a zero update.
    """

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._update(hidden_arg(args, kwargs))


@dataclass
class Installed:
    """Handle of stand-ins put in by :func:`swap_units_`; :meth:`remove` undoes everything."""

    slots: dict[Unit, nn.Module] = field(default_factory=dict)
    _undo: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    _hooks: list[Any] = field(default_factory=list)

    def swap(self, root: nn.Module, dotted: str, new: nn.Module) -> None:
        """Put ``new`` at ``root``'s dotted path, remembering the old module."""
        prefix, _, name = dotted.rpartition(".")
        parent = get_submodule(root, prefix) if prefix else root
        self._undo.append((parent, name, get_submodule(parent, name)))
        parent._modules[name] = new

    def remove(self) -> None:
        """Put back the original modules by identity and drop the hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for parent, name, old in reversed(self._undo):
            parent._modules[name] = old
        self._undo.clear()

    def emulators(self) -> Iterator[tuple[Unit, nn.Module]]:
        for unit, slot in self.slots.items():
            emulator = getattr(slot, "emulator", None)
            if emulator is not None:
                yield unit, emulator


def removed_paths(units: Iterable[Unit]) -> dict[int, set[str]]:
    """Layer index -> the sublayer kinds (``attn``, ``mlp``) that ``units`` remove there."""
    out: dict[int, set[str]] = {}
    for unit in units:
        out.setdefault(unit.index, set()).update(s.kind for s in unit.sublayers())
    return out


def swap_units_(
    layout: ModelLayout, stand_ins: Mapping[Unit, nn.Module | None], *, placeholder_cache: bool
) -> Installed:
    """Replace the paths of ``stand_ins`` by slots, in place; the one mechanism behind
    :func:`mask_units` and :func:`depthprune.recover.install.install_`.

    Each removed path's module becomes an :class:`AttnSlot` or :class:`MlpSlot`, its
    post-norms ``nn.Identity`` (the stand-in's update is added as is), and its pre-norms
    ``nn.Identity`` unless a kept path of the layer also reads them (Phi's shared norm).
    A slot with an emulator is fed the raw stream entering its path by
    :meth:`ResidualStream.on_input`. A block is emulated in its attention slot; its MLP
    slot returns zero.

    Args:
        layout: The model and its family spec.
        stand_ins: Unit -> emulator (input and output ``(B, T, D)``), or ``None`` for a
            zero update. A block and one of its sublayers must not both be given.
        placeholder_cache: See :class:`AttnSlot`.

    Returns:
        The handle whose ``remove()`` restores the model exactly (by identity).
    """
    spec, stream = layout.spec, layout.stream
    gone = removed_paths(stand_ins)
    handle = Installed()
    try:
        for unit in sorted(stand_ins):
            layer = layout.layers[unit.index]
            kept_norms = {n for k in SUBLAYER_KINDS if k not in gone[unit.index] for n in spec.path(k).pre_norms}
            for n, part in enumerate(unit.sublayers()):
                path = spec.path(part.kind)
                emulator = stand_ins[unit] if n == 0 else None
                for name in path.post_norms:
                    handle.swap(layer, name, nn.Identity())
                for name in path.pre_norms:
                    if name not in kept_norms and not isinstance(get_submodule(layer, name), nn.Identity):
                        handle.swap(layer, name, nn.Identity())
                slot: _Slot
                if part.kind == "attn":
                    slot = AttnSlot(unit.index, path.cache_arg or "", emulator, placeholder_cache)
                else:
                    slot = MlpSlot(emulator)
                handle.swap(layer, path.module, slot)
                handle.slots[unit if n == 0 else part] = slot
                if emulator is not None:
                    # Registered after the swaps, so it sits on the stand-ins that are in place.
                    handle._hooks.append(stream.on_input(layer, part.kind, slot._box.put))
    except BaseException:
        handle.remove()
        raise
    return handle


@contextlib.contextmanager
def mask_units(model: nn.Module, units: Iterable[Unit | str], spec: ArchSpec | None = None) -> Iterator[None]:
    """Disable ``units`` inside the ``with`` block; restore the model exactly on exit.

    Args:
        model: A Hugging Face causal LM of a supported family.
        units: Units to disable (``block.i`` disables both sublayers of layer ``i``).
        spec: The family spec; looked up from ``model.config`` when omitted.

    The original modules are put back by identity, so outputs after the block are bitwise
    identical to before it. Masked attentions write a cache placeholder (see
    :class:`AttnSlot`), which works with any cache, whichever units are masked.
    """
    layout = ModelLayout.of(model, spec)
    parsed = [u if isinstance(u, Unit) else Unit.parse(u, layout.n_layers) for u in units]
    layout.check_units(parsed)
    handle = swap_units_(layout, dict.fromkeys(expand_sublayers(parsed)), placeholder_cache=True)
    try:
        yield
    finally:
        handle.remove()
