"""Where a model's inputs go, and checking device maps, for plain and dispatched models.

A model is either on one device (``model.to(device)``) or dispatched by accelerate across
several (``device_map``): its layers then sit on different GPUs, the CPU or disk, each with
an ``AlignDevicesHook`` that moves its inputs to its execution device. Code that feeds the
model must not read ``next(model.parameters()).device``: with a device map that is just
where the first weight lives (``meta`` when it is offloaded). It asks :func:`input_device`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from depthprune.errors import InputError

# Token ids, masks and index tensors are built here, explicitly, and moved to the model's
# input device in one copy per batch: building them element by element on a GPU would cost
# one transfer per row. Nothing the model computes is created here.
HOST = torch.device("cpu")


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on, or ``None`` when it has no accelerate hook."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is None:
        return None
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate execution device, else its first real weight's device."""
    hooked = execution_device(module)
    if hooked is not None:
        return hooked
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")  # a module without weights runs wherever its input is


def input_device(model: nn.Module) -> torch.device:
    """The device token ids and masks must be on: the input embedding's."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if isinstance(embeddings, nn.Module):
        hooked = execution_device(embeddings)
        if hooked is not None:
            return hooked
        for p in embeddings.parameters():
            if p.device.type != "meta":
                return p.device
    return module_device(model)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: Any) -> None:
    """Check a ``device_map``: ``None``, an accelerate strategy name, or module -> place.

    Raises:
        InputError: an unknown strategy, or a dict whose places are not ``cpu``, ``disk``,
            a GPU index or an existing device.
    """
    if device_map is None:
        return
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise InputError(
                f"device map {device_map!r} is unknown; expected one of {', '.join(DEVICE_MAP_STRATEGIES)} "
                "or a JSON object from module name to cpu, disk or a GPU index"
            )
        return
    if not isinstance(device_map, dict) or not device_map:
        raise InputError(f"device map {device_map!r} is invalid; expected a strategy name or a module -> place object")
    for module, place in device_map.items():
        if not isinstance(module, str):
            raise InputError(f"device map key {module!r} is not a module name")
        if isinstance(place, bool) or not isinstance(place, (str, int)):
            raise InputError(f"device map place {place!r} of {module!r} is invalid; expected cpu, disk or a GPU index")
        if place == "disk":
            continue
        from depthprune.loading import check_device  # loading imports this module

        check_device(f"cuda:{place}" if isinstance(place, int) else place)


def parse_device_map(text: str | None) -> str | dict[str, str | int] | None:
    """A ``--device-map`` value: a strategy name, or a JSON object (inline or a file path)."""
    import json
    import os

    if text is None:
        return None
    if text in DEVICE_MAP_STRATEGIES:
        return text
    source = text
    if not text.lstrip().startswith("{") and os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            source = f.read()
    try:
        value = json.loads(source)
    except json.JSONDecodeError:
        raise InputError(
            f"--device-map {text!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) "
            "nor a JSON object (inline or in a file)"
        ) from None
    check_device_map(value)
    return value
