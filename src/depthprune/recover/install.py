"""Putting removed or emulated units into a model, family-agnostically.

A removed unit's path keeps its slot in the decoder layer, but the slot's module is
swapped for one that returns the unit's replacement update:

- plain removal: zero;
- emulation: ``emulator(h)``, where ``h`` is the *raw* residual stream entering the path
  (the layer input for attention, block, and the MLP of a parallel family; the input of
  the MLP's first pre-norm for a sequential family), never the pre-norm's output.

The raw stream is handed to the slot by a forward pre-hook: on the layer, or on the MLP's
first pre-norm. Pre-norms that only a removed path reads become ``nn.Identity`` (nothing
reads their output any more); a pre-norm shared with a kept path (Phi's single norm) stays.
Post-norms of a removed path become ``nn.Identity``, so the replacement update is added
to the stream as is. A removed block is emulated in its attention slot, and its MLP slot
returns zero.

The same function builds in-memory emulation (undone exactly by :meth:`Installed.remove`)
and the layers of exported :mod:`depthprune.pruned_classes` models, so both compute the same
logits.

KV cache: a removed attention writes no keys or values. When it first sees a cache it turns
its own cache slot into transformers' ``DummyLayer``, which holds nothing and which the
cache skips when it computes sequence lengths and mask sizes, so positions and masks of
later calls stay right. When the model keeps no attention at all there is no layer to
measure the length from, so the slots then write a ``(B, 1, T, 1)`` placeholder instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from depthprune.architectures import ArchSpec, get_submodule
from depthprune.errors import InputError
from depthprune.stream import hidden_arg
from depthprune.units import ModelLayout, Unit

logger = logging.getLogger(__name__)


class _StreamBox:
    """Holds the raw stream of the current forward pass between a hook and a slot.

    A plain object (not a module or a tensor attribute) so that ``copy.deepcopy`` of the
    model maps the hook's and the slot's references to the same copy.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("an emulated unit ran without the stream that feeds it; was its hook removed?")
        return value


def _stash_layer_input(box: _StreamBox, _module: nn.Module, args: tuple, kwargs: dict) -> None:
    box.value = hidden_arg(args, kwargs)


def _stash_first_arg(box: _StreamBox, _module: nn.Module, args: tuple) -> None:
    box.value = args[0]


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


class AttnSlot(nn.Module):
    """Stands in for a removed attention module (or a removed block, in its attention slot).

    Args:
        layer_index: The layer's position in the decoder list, under which it uses the cache.
        cache_arg: Keyword under which the decoder layer passes the cache.
        emulator: Computes the update from the raw stream; ``None`` for a zero update.
        placeholder_cache: Write a ``(B, 1, T, 1)`` placeholder instead of releasing the
            cache slot (needed when no layer of the model keeps attention).
    """

    def __init__(
        self, layer_index: int, cache_arg: str, emulator: nn.Module | None = None, placeholder_cache: bool = False
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.cache_arg = cache_arg
        self.emulator = emulator
        self.placeholder_cache = placeholder_cache
        self._box = _StreamBox()

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        hidden = hidden_arg(args, kwargs)  # (B, T, D), possibly pre-normed
        cache = kwargs.get(self.cache_arg)
        if cache is not None:
            if self.placeholder_cache:
                placeholder = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
                cache.update(placeholder, placeholder, self.layer_index)
            else:
                _release_cache_slot(cache, self.layer_index)
        if self.emulator is None:
            return torch.zeros_like(hidden), None
        return self.emulator(self._box.take()).to(hidden.dtype), None

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, cache={'placeholder' if self.placeholder_cache else 'none'}"


class MlpSlot(nn.Module):
    """Stands in for a removed MLP module.

    Args:
        emulator: Computes the update from the raw stream; ``None`` for a zero update.
        own_input: The slot's own input is the raw stream (the family has no MLP pre-norm).
    """

    def __init__(self, emulator: nn.Module | None = None, own_input: bool = False) -> None:
        super().__init__()
        self.emulator = emulator
        self.own_input = own_input
        self._box = _StreamBox()

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.emulator is None:
            return torch.zeros_like(hidden)  # (B, T, D)
        stream = hidden if self.own_input else self._box.take()
        return self.emulator(stream).to(hidden.dtype)


@dataclass
class Installed:
    """Handle of units installed by :func:`install_`; :meth:`remove` undoes everything."""

    slots: dict[Unit, nn.Module] = field(default_factory=dict)
    _undo: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    _hooks: list[Any] = field(default_factory=list)

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


def _swap(layer: nn.Module, dotted: str, new: nn.Module, undo: list) -> None:
    prefix, _, name = dotted.rpartition(".")
    parent = get_submodule(layer, prefix) if prefix else layer
    undo.append((parent, name, get_submodule(parent, name)))
    parent._modules[name] = new


def removed_paths(units: Mapping[Unit, Any] | list[Unit]) -> dict[int, set[str]]:
    """Layer index -> the sublayer kinds (``attn``, ``mlp``) that ``units`` remove there."""
    out: dict[int, set[str]] = {}
    for unit in units:
        out.setdefault(unit.index, set()).update(s.kind for s in unit.sublayers())
    return out


def check_replacements(replacements: Mapping[Unit, nn.Module | None], n_layers: int) -> None:
    """Refuse overlapping units (a block and one of its sublayers) and out-of-range ones."""
    for unit in replacements:
        if not 0 <= unit.index < n_layers:
            raise InputError(f"unit {unit} is out of range: the model has {n_layers} layers (indices 0..{n_layers - 1})")
    blocks = {u.index for u in replacements if u.kind == "block"}
    overlap = sorted(str(u) for u in replacements if u.kind != "block" and u.index in blocks)
    if overlap:
        raise InputError(f"{', '.join(overlap)} overlap a removed block; list either the block or its sublayers")


def install_(
    model: nn.Module,
    replacements: Mapping[Unit, nn.Module | None],
    spec: ArchSpec | None = None,
) -> Installed:
    """Remove units of ``model`` in place, emulating those that have an emulator.

    Args:
        model: A causal LM of a supported family.
        replacements: Unit -> emulator module (input and output ``(B, T, D)``), or ``None``
            for plain removal. Indices are positions in the model's current layer list.
        spec: The family spec; looked up from ``model.config`` when omitted.

    Returns:
        An :class:`Installed` handle whose ``remove()`` restores the model exactly.
    """
    layout = ModelLayout.of(model, spec)
    check_replacements(replacements, layout.n_layers)
    spec = layout.spec
    parallel = layout.parallel
    gone = removed_paths(list(replacements))
    keeps_attention = any("attn" not in gone.get(i, set()) for i in range(layout.n_layers))
    handle = Installed()
    try:
        for unit in sorted(replacements):
            _install_unit(layout, spec, parallel, unit, replacements[unit], gone[unit.index], keeps_attention, handle)
    except BaseException:
        handle.remove()
        raise
    return handle


def _install_unit(
    layout: ModelLayout,
    spec: ArchSpec,
    parallel: bool,
    unit: Unit,
    emulator: nn.Module | None,
    gone_here: set[str],
    keeps_attention: bool,
    handle: Installed,
) -> None:
    layer = layout.layers[unit.index]
    kinds = ("attn", "mlp") if unit.kind == "block" else (unit.kind,)
    kept_norms = {n for k in ("attn", "mlp") if k not in gone_here for n in spec.path(k).pre_norms}
    for kind in kinds:
        path = spec.path(kind)
        emu = emulator if kind == kinds[0] else None  # a block is emulated in its attention slot
        for name in path.post_norms:
            _swap(layer, name, nn.Identity(), handle._undo)
        for name in path.pre_norms:
            if name not in kept_norms and not isinstance(get_submodule(layer, name), nn.Identity):
                _swap(layer, name, nn.Identity(), handle._undo)
        if kind == "attn":
            slot: nn.Module = AttnSlot(unit.index, path.cache_arg or "", emu, placeholder_cache=not keeps_attention)
        else:
            slot = MlpSlot(emu, own_input=not parallel and not path.pre_norms)
        _swap(layer, path.module, slot, handle._undo)
        handle.slots[unit if kind == kinds[0] else Unit(kind, unit.index)] = slot  # type: ignore[arg-type]
        if emu is None or getattr(slot, "own_input", False):
            continue
        box = slot._box  # type: ignore[attr-defined]
        if kind == "attn" or parallel:
            hook = layer.register_forward_pre_hook(functools.partial(_stash_layer_input, box), with_kwargs=True)
        else:
            tap = get_submodule(layer, path.pre_norms[0])
            hook = tap.register_forward_pre_hook(functools.partial(_stash_first_arg, box))
        handle._hooks.append(hook)


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a transformers cache."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
