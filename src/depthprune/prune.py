"""Physical removal of decoder blocks."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from depthprune.architectures import ArchSpec
from depthprune.errors import InputError
from depthprune.units import ModelLayout, Unit, parse_units

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_` did.

    Attributes:
        removed: The removed units, with original indices.
        index_map: Original layer index -> new index, or ``None`` for a removed layer.
        n_layers_before: Layer count before removal.
        n_layers_after: Layer count after removal.
        params_before: Parameter count before removal.
        params_after: Parameter count after removal.
    """

    removed: tuple[Unit, ...]
    index_map: dict[int, int | None] = field(default_factory=dict)
    n_layers_before: int = 0
    n_layers_after: int = 0
    params_before: int = 0
    params_after: int = 0


def validate_removal(units: Iterable[Unit | str], n_layers: int) -> list[Unit]:
    """Parse and check a set of units to remove physically.

    Raises:
        InputError: a unit is malformed or out of range, a sublayer is named (that needs
            the emulation-aware export), or every block would be removed.
    """
    parsed = parse_units(list(units), n_layers)
    sublayers = [str(u) for u in parsed if u.kind != "block"]
    if sublayers:
        raise InputError(
            f"cannot physically remove sublayers ({', '.join(sublayers)}): a standard checkpoint has no way "
            "to express a layer without attention or MLP; remove whole blocks (block.N) for now"
        )
    if len(parsed) >= n_layers:
        raise InputError(f"cannot remove every block: the model has {n_layers} layers and {len(parsed)} were given")
    return parsed


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_(model: nn.Module, units: Iterable[Unit | str], spec: ArchSpec | None = None) -> PruneResult:
    """Delete whole blocks from ``model`` in place and fix everything that counts layers.

    The decoder ``ModuleList`` loses the removed layers, each kept layer's ``layer_idx``
    attributes (used to index the KV cache) are renumbered, the config's layer count is
    updated and its per-layer lists (such as ``layer_types``) are sliced.

    Args:
        model: A Hugging Face causal LM of a supported family.
        units: ``block.i`` units, with original indices.
        spec: The family spec; looked up from ``model.config`` when omitted.

    Returns:
        A :class:`PruneResult` with the map from original to new layer indices.
    """
    layout = ModelLayout.of(model, spec)
    n_before = layout.n_layers
    removed = validate_removal(units, n_before)
    drop = {u.index for u in removed}
    params_before = _param_count(model)
    keep = [i for i in range(n_before) if i not in drop]
    old_layers = layout.layers
    new_layers = nn.ModuleList([old_layers[i] for i in keep])
    for new_index, layer in enumerate(new_layers):
        for module in layer.modules():
            # Transformers' convention: attention modules (and some layers) carry the
            # index under which they use the KV cache.
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    prefix, _, name = layout.spec.layers.rpartition(".")
    parent = model.get_submodule(prefix) if prefix else model
    parent._modules[name] = new_layers

    config = model.config
    for key in layout.spec.per_layer_keys:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)):
            if len(values) != n_before:
                raise InputError(f"config.{key} has {len(values)} entries but the model has {n_before} layers")
            setattr(config, key, [values[i] for i in keep])
    setattr(config, layout.spec.num_layers_key, len(keep))
    index_map: dict[int, int | None] = {i: None for i in range(n_before)}
    index_map.update({old: new for new, old in enumerate(keep)})
    logger.info("removed %d of %d blocks: %s", len(drop), n_before, ", ".join(map(str, removed)))
    return PruneResult(
        removed=tuple(removed),
        index_map=index_map,
        n_layers_before=n_before,
        n_layers_after=len(keep),
        params_before=params_before,
        params_after=_param_count(model),
    )
