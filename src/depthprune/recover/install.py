"""Putting removed or emulated units into a model, family-agnostically.

A removed unit's path keeps its slot in the decoder layer, but the slot's module is
swapped for one that returns the unit's replacement update:

- plain removal: zero;
- emulation: ``emulator(h)``, where ``h`` is the *raw* residual stream entering the path,
  as :mod:`depthprune.stream` defines it (the layer input for attention, block, and the
  MLP of a parallel family; the stream after the attention add for a sequential MLP),
  never the pre-norm's output;
- a linear emulator (:class:`~depthprune.recover.emulate.LinearEmulator`) reads instead
  the output of the last kept writer before the unit
  (:meth:`~depthprune.stream.ResidualStream.writer_before`), handed over by a hook on it.

The swapping is :func:`depthprune.units.swap_units_`, the mechanism masking uses too:
post-norms of a removed path and pre-norms that only it reads become ``nn.Identity``; a
pre-norm shared with a kept path (Phi's single norm) stays. A removed block is emulated in
its attention slot, and its MLP slot returns zero.

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

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from depthprune.architectures import ArchSpec
from depthprune.errors import InputError
from depthprune.units import (
    Installed,
    ModelLayout,
    StreamBox,
    Unit,
    removed_paths,
    swap_units_,
)

logger = logging.getLogger(__name__)


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
    gone = removed_paths(replacements)
    keeps_attention = any("attn" not in gone.get(i, set()) for i in range(layout.n_layers))
    handle = swap_units_(layout, replacements, placeholder_cache=not keeps_attention)
    stream = layout.stream
    try:
        for unit, emulator in replacements.items():
            tap = getattr(emulator, "tap", None)
            if isinstance(tap, StreamBox):  # a LinearEmulator: it reads the writer before the unit
                writer, _ = stream.writer_before(unit.kind, unit.index, gone)
                handle._hooks.append(stream.on_writer(model, layout.layers, writer, tap.put))
    except BaseException:
        handle.remove()
        raise
    return handle


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a transformers cache."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
