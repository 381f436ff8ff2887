"""Model classes for exports with removed sublayers or emulation modules.

A standard checkpoint cannot say "layer 3 has no attention" or "layer 5's MLP is a
low-rank map", so such exports get their own config and model classes, one pair per
family, built generically from the family's transformers classes:

- ``DepthPruned<BaseConfig>`` subclasses the family's config class with
  ``model_type = "depthprune_<family>"`` and carries a ``depthprune`` dict (see
  :func:`depthprune_info`);
- ``DepthPruned<BaseModel>`` (e.g. ``DepthPrunedLlamaForCausalLM``) subclasses the family's
  causal-LM class; its ``__init__`` builds the base model and then installs the recorded
  removals and emulators with :func:`depthprune.recover.install.install_`, the same code
  that emulates units in memory, so both compute the same logits.

``import depthprune`` registers every pair with ``AutoConfig`` and
``AutoModelForCausalLM`` (when transformers is imported, so the CLI starts fast), and
:func:`load` loads any export offline. Plain transformers, without depthprune, does not
know ``model_type = "depthprune_<family>"`` and refuses the folder, so such a checkpoint is
never loaded silently as the unpruned architecture with random weights.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from depthprune import __version__
from depthprune.errors import InputError, ModelLoadError, check_choice

if TYPE_CHECKING:
    from torch import nn

    from depthprune.architectures import ArchSpec
    from depthprune.prune import PruneResult
    from depthprune.units import Unit

# This module is imported by ``import depthprune``, so it imports torch and transformers
# only inside functions: the CLI and the package stay fast to import.

logger = logging.getLogger(__name__)

MODEL_TYPE_PREFIX = "depthprune_"
CONFIG_KEY = "depthprune"
# Exports keep their weights in model.depthprune.safetensors (a transformers "variant"):
# the family's own class, called directly, then finds no weights and fails instead of
# loading the unpruned architecture with random layers.
WEIGHTS_VARIANT = "depthprune"
FORMAT_VERSION = 1


def model_type_for(family: str) -> str:
    """The ``model_type`` of a family's depthprune export, e.g. ``depthprune_llama``."""
    return f"{MODEL_TYPE_PREFIX}{family}"


def _spec_of_family(family: str) -> ArchSpec:
    from depthprune.architectures import all_specs

    for spec in all_specs():
        if spec.family == family:
            return spec
    raise ModelLoadError(
        f"this export was made for model family {family!r}, which this depthprune does not know; "
        f"known families: {', '.join(sorted(s.family for s in all_specs()))}"
    )


@functools.cache
def classes_for(family: str) -> tuple[type, type]:
    """The ``(config class, model class)`` of a family's depthprune exports, built once.

    Raises:
        ModelLoadError: the family is unknown or its transformers class does not exist.
    """
    import transformers

    spec = _spec_of_family(family)
    base_model = getattr(transformers, spec.architectures[0], None)
    if base_model is None:
        raise ModelLoadError(
            f"transformers {transformers.__version__} has no class {spec.architectures[0]!r} for family {family!r}; "
            "upgrade transformers"
        )
    base_config = base_model.config_class
    config_cls = type(
        f"DepthPruned{base_config.__name__}",
        (base_config,),
        {
            "model_type": model_type_for(family),
            "__module__": __name__,
            "__doc__": f"{base_config.__name__} of a depthprune export; ``depthprune`` says what was removed.",
        },
    )

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base_model.__init__(self, config, *args, **kwargs)
        _install_from_config(self, spec)

    def from_pretrained(klass: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("variant", WEIGHTS_VARIANT)
        return super(model_cls, klass).from_pretrained(*args, **kwargs)

    model_cls = type(
        f"DepthPruned{base_model.__name__}",
        (base_model,),
        {
            "config_class": config_cls,
            "__init__": __init__,
            "from_pretrained": classmethod(from_pretrained),
            "__module__": __name__,
            "__doc__": f"{base_model.__name__} with the removed units and emulators of ``config.depthprune``.",
        },
    )
    _share_weight_conversions(base_model.__name__, model_cls.__name__)
    _share_weight_conversions(base_config.model_type, config_cls.model_type)
    return config_cls, model_cls


def _share_weight_conversions(base: str, new: str) -> None:
    """Give ``new`` the checkpoint key renamings of ``base`` (e.g. GPT-NeoX's ``embed_out``).

    Transformers looks these up by class name, then ``model_type``, on both save and load;
    without this, a family whose checkpoints use legacy names would save under one name
    and load another.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older transformers rename nothing by model_type
        return
    mapping = get_checkpoint_conversion_mapping(base)
    if mapping is not None:
        register_checkpoint_conversion_mapping(new, mapping, overwrite=True)


def depthprune_info(config: Any) -> dict[str, Any]:
    """The ``depthprune`` dict of an export's config, checked.

    Its keys: ``format`` (version of this layout), ``family``, ``base_model_type``,
    ``base_architecture``, ``n_layers_source`` (layers before pruning), ``index_map``
    (original layer -> new layer or ``None``), and ``units``: one entry per unit that keeps
    a slot, ``{"unit": "attn.5", "layer": 3, "replace": "lowrank:8"}``, with the original
    unit name, the layer's new index and what stands in for it (``none``, ``bias``,
    ``lowrank:R``, ``linear:R``; a ``block`` entry is always emulated).

    Raises:
        ModelLoadError: the config has no such dict, or it is malformed.
    """
    info = getattr(config, CONFIG_KEY, None)
    if not isinstance(info, dict) or not isinstance(info.get("units"), list) or "family" not in info:
        raise ModelLoadError(
            f"config of model_type {getattr(config, 'model_type', None)!r} has no valid {CONFIG_KEY!r} entry; "
            "expected {'family': ..., 'units': [...]} as written by depthprune export"
        )
    if info.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise ModelLoadError(
            f"this export uses depthprune format {info['format']}, newer than this depthprune ({__version__}) reads "
            f"({FORMAT_VERSION}); upgrade depthprune"
        )
    return info


def _install_from_config(model: nn.Module, spec: ArchSpec) -> None:
    from depthprune.recover.emulate import empty_emulator
    from depthprune.recover.install import install_
    from depthprune.units import Unit

    info = depthprune_info(model.config)
    param = next(model.parameters())
    dim = int(model.config.hidden_size)
    replacements: dict[Unit, nn.Module | None] = {}
    for entry in info["units"]:
        try:
            kind = Unit.parse(entry["unit"]).kind
            unit = Unit(kind, int(entry["layer"]))
            replacements[unit] = empty_emulator(entry["replace"], dim, param.dtype, param.device)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"malformed {CONFIG_KEY} unit entry {entry!r}: {exc}") from exc
    install_(model, replacements, spec)


def spec_of(model_or_config: Any) -> ArchSpec:
    """The family spec of a model or config, including depthprune exports."""
    from depthprune.architectures import spec_for_config

    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(getattr(config, CONFIG_KEY, None), dict):
        return _spec_of_family(depthprune_info(config)["family"])
    return spec_for_config(config)


def to_depthpruned_(
    model: nn.Module,
    replacements: Mapping[Unit, nn.Module | None],
    spec: ArchSpec | None = None,
) -> PruneResult:
    """Turn ``model`` in place into its family's depthprune class, ready to save.

    Whole blocks with no emulator are deleted with :func:`depthprune.prune.prune_`; every
    other unit keeps its slot and gets a no-op or its emulator. The model's class and its
    config's class become the ``DepthPruned`` ones, and ``config.depthprune`` records the
    units, so ``save_pretrained`` writes a folder that :func:`load` rebuilds exactly.

    Args:
        model: A causal LM of a supported family, not yet pruned.
        replacements: Unit (original indices) -> emulator, or ``None`` for plain removal.
        spec: The family spec; looked up from ``model.config`` when omitted.

    Returns:
        A :class:`PruneResult` over all units, with the layer index map.
    """
    from depthprune.prune import PruneResult, prune_
    from depthprune.recover.emulate import describe
    from depthprune.recover.install import check_replacements, install_
    from depthprune.units import ModelLayout, Unit

    if is_depthpruned(model):
        raise InputError(
            f"{type(model).__name__} is already a depthprune model; prune the original model once with every unit"
        )
    layout = ModelLayout.of(model, spec)
    spec = layout.spec
    n_before = layout.n_layers
    check_replacements(replacements, n_before)
    params_before = sum(p.numel() for p in model.parameters())
    base_model_type = model.config.model_type
    base_architecture = type(model).__name__
    drop = [u for u, e in replacements.items() if u.kind == "block" and e is None]
    index_map: dict[int, int | None] = {i: i for i in range(n_before)}
    if drop:
        index_map = prune_(model, drop, spec).index_map
    kept = {Unit(u.kind, index_map[u.index]): e for u, e in replacements.items() if u not in drop}  # type: ignore[arg-type]
    install_(model, kept, spec)
    config_cls, model_cls = classes_for(spec.family)
    units = [
        {"unit": str(u), "layer": index_map[u.index], "replace": describe(e)}
        for u, e in sorted(replacements.items())
        if u not in drop
    ]
    # The config object is shared by the model's submodules, so its class is changed in
    # place rather than replaced by a copy.
    model.config.__class__ = config_cls
    setattr(
        model.config,
        CONFIG_KEY,
        {
            "format": FORMAT_VERSION,
            "version": __version__,
            "family": spec.family,
            "base_model_type": base_model_type,
            "base_architecture": base_architecture,
            "n_layers_source": n_before,
            "index_map": {str(k): v for k, v in index_map.items()},
            "units": units,
        },
    )
    model.__class__ = model_cls
    return PruneResult(
        removed=tuple(sorted(replacements)),
        index_map=index_map,
        n_layers_before=n_before,
        n_layers_after=layout.n_layers,
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
    )


# --------------------------------------------------------------------------- registration


def register_auto_classes() -> list[str]:
    """Register every family's depthprune classes with ``AutoConfig`` and ``AutoModelForCausalLM``.

    Idempotent. Families whose transformers class is missing are skipped.

    Returns:
        The registered model types.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from depthprune.architectures import all_specs

    done = []
    for spec in all_specs():
        try:
            config_cls, model_cls = classes_for(spec.family)
        except ModelLoadError as exc:
            logger.debug("not registering %s: %s", spec.family, exc)
            continue
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        done.append(config_cls.model_type)
    return done


class _Loader(importlib.abc.Loader):
    """Runs a module's own loader, then a callback."""

    def __init__(self, inner: importlib.abc.Loader, callback: Callable[[], Any]) -> None:
        self._inner = inner
        self._callback = callback

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        module.__loader__ = self._inner
        try:
            self._callback()
        except Exception as exc:  # never break the user's import of transformers
            logger.warning("depthprune could not register its model classes with transformers: %s", exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callback`` once, right after the module ``name`` is first imported."""

    def __init__(self, name: str, callback: Callable[[], Any]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self.callback)
        return spec


def register_on_import() -> None:
    """Register the Auto classes now if transformers is imported, else right after it is.

    ``import depthprune`` calls this, so ``AutoModelForCausalLM.from_pretrained(OUT)``
    works after it without making ``import depthprune`` pay for importing transformers.
    """
    if "transformers" in sys.modules:
        register_auto_classes()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("transformers", register_auto_classes))


# --------------------------------------------------------------------------- loading


def load(
    path: str | os.PathLike[str],
    *,
    dtype: str = "auto",
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load an exported model folder offline: a depthprune export or a standard checkpoint.

    Args:
        path: The folder written by ``depthprune prune``.
        dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``.
        device: Torch device to put the model on.
        attn_implementation: Passed to ``from_pretrained`` (e.g. ``"eager"``).

    Returns:
        The model, in eval mode.

    Raises:
        ModelLoadError: the folder is missing or cannot be loaded.
    """
    import torch

    from depthprune.loading import (
        DTYPES,
        check_device,
        from_pretrained_checked,
        resolve_local,
    )

    folder = resolve_local(str(path))
    check_choice(dtype, DTYPES, "dtype")
    check_device(device)
    register_auto_classes()
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = from_pretrained_checked(str(folder), str(path), **kwargs)
    return model.to(torch.device(device)).eval()


def is_depthpruned(folder_or_model: Any) -> bool:
    """Whether a model, config or folder is a depthprune export (needs depthprune to load)."""
    if isinstance(folder_or_model, (str, os.PathLike)):
        import json

        cfg = Path(folder_or_model) / "config.json"
        if not cfg.is_file():
            return False
        return str(json.loads(cfg.read_text(encoding="utf-8")).get("model_type", "")).startswith(MODEL_TYPE_PREFIX)
    config = getattr(folder_or_model, "config", folder_or_model)
    return isinstance(getattr(config, CONFIG_KEY, None), dict)


register_on_import()
