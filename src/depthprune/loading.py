"""Loading models and tokenizers from a local folder, a GGUF file or the Hugging Face Hub.

A path ending in ``.gguf`` that is not a folder goes to :mod:`depthprune.gguf_import`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from torch import nn

from depthprune.architectures import ArchSpec, check_model, spec_for_config
from depthprune.devices import check_device, check_device_map
from depthprune.errors import (
    DepthPruneError,
    InputError,
    ModelLoadError,
    check_choice,
    first_line,
)

logger = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    # depthprune exports (see depthprune.pruned_classes.WEIGHTS_VARIANT)
    "model.depthprune.safetensors",
    "model.safetensors.index.depthprune.json",
)


@dataclass(frozen=True)
class LoadConfig:
    """Which model to load, and how.

    Attributes:
        model: A local model folder or a Hugging Face Hub id.
        dtype: Weight dtype; ``auto`` keeps the checkpoint's.
        device: Torch device to put the model on, e.g. ``cpu`` or ``cuda:0``.
        trust_remote_code: Allow code from the model repository to run. Off by default.
        attn_implementation: Passed to ``from_pretrained`` (e.g. ``"eager"``); ``None``
            lets transformers choose.
        load_tokenizer: Also load the tokenizer; a model without one gets ``None``.
        device_map: Let accelerate place the model instead of ``device``: ``auto``,
            ``balanced``, ``balanced_low_0`` or ``sequential`` (across every GPU, then CPU
            and disk), or a dict from module name to ``"cpu"``, ``"disk"``, a GPU index or
            a device name, as ``from_pretrained(device_map=...)`` takes it.
        offload_folder: Where accelerate keeps weights placed on ``"disk"``.
    """

    model: str
    dtype: DType = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    load_tokenizer: bool = True
    device_map: str | dict[str, str | int] | None = None
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(self.model))
        if not isinstance(self.model, str) or not self.model.strip():
            raise InputError(
                f"model {self.model!r} is not a model reference; give a local model folder or a Hub id such as org/name"
            )
        check_choice(self.dtype, DTYPES, "dtype")
        check_device(self.device)
        check_device_map(self.device_map)
        if self.offload_folder is not None:
            object.__setattr__(self, "offload_folder", os.fspath(self.offload_folder))
        for name in ("trust_remote_code", "load_tokenizer"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} {getattr(self, name)!r} is invalid; expected true or false")
        attn = self.attn_implementation
        if attn is not None and (not isinstance(attn, str) or not attn):
            raise InputError(
                f"attn_implementation {self.attn_implementation!r} is invalid; expected a name such as eager or sdpa, or None"
            )


def as_load_config(model: LoadConfig | str | os.PathLike[str], **options: Any) -> LoadConfig:
    """A :class:`LoadConfig` from a config or a model reference, with ``options`` applied.

    ``as_load_config("org/name", dtype="float32")`` is ``LoadConfig("org/name", dtype="float32")``;
    with a ``LoadConfig``, ``options`` replace its fields. An unknown option is a ``TypeError``.
    """
    if isinstance(model, LoadConfig):
        return replace(model, **options) if options else model
    return LoadConfig(model, **options)  # type: ignore[arg-type]


@dataclass
class LoadedModel:
    """A loaded causal LM, its tokenizer (if any), its family spec and where it came from."""

    model: nn.Module
    tokenizer: Any | None
    spec: ArchSpec
    source: str
    local_dir: Path | None

    @property
    def n_layers(self) -> int:
        from depthprune.units import ModelLayout

        return ModelLayout(self.model, self.spec).n_layers


def is_local_reference(name: str) -> bool:
    """Whether ``name`` must be a local path (it exists, or cannot be a Hub id)."""
    return os.path.exists(name) or not _HUB_ID.match(name) or name.startswith((".", "~"))


def resolve_local(name: str) -> Path:
    """Check that a local model reference is a model folder, or a GGUF file.

    Returns:
        The folder, or for a ``.gguf`` path the file itself once its header is checked.

    Raises:
        ModelLoadError: the path does not exist, is a file (other than a GGUF file), has
            no ``config.json``, or is a GGUF file that is truncated or malformed.
    """
    from depthprune.gguf_import import has_gguf_magic, is_gguf_path, read_gguf_header

    if is_gguf_path(name):
        return read_gguf_header(name).path
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {name!r} does not exist; give a model folder or a Hub id such as org/name")
    if not path.is_dir() and has_gguf_magic(path):
        raise ModelLoadError(f"{name!r} is a GGUF file without the .gguf extension; rename it to end in .gguf")
    if not path.is_dir():
        raise ModelLoadError(
            f"{name!r} is a file, not a model folder; a llama2.c checkpoint is imported with "
            "`depthprune convert-llama2c`, and a GGUF file must end in .gguf"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{name!r} is not a Hugging Face model folder: it has no config.json "
            "(expected config.json and safetensors weights, as written by save_pretrained)"
        )
    return path


def load_config(
    model: LoadConfig | str | os.PathLike[str], trust_remote_code: bool | None = None
) -> tuple[Any, Path | None]:
    """Load a model's Hugging Face config only (cheap), from a local folder, a GGUF file or the Hub.

    Args:
        model: A :class:`LoadConfig`, or a model reference.
        trust_remote_code: Overrides the config's value; ``None`` keeps it (off for a
            bare reference).

    Returns:
        The config, and the local folder the model lives in (for a GGUF file, the folder
        holding it; ``None`` for a Hub id).

    Raises:
        ModelLoadError: the path or id has no loadable config.
    """
    from transformers import AutoConfig

    from depthprune.gguf_import import is_gguf_path, load_gguf_config

    options = {} if trust_remote_code is None else {"trust_remote_code": trust_remote_code}
    load = as_load_config(model, **options)
    name = load.model
    if is_gguf_path(name):
        return load_gguf_config(name), Path(name).expanduser().parent
    local = resolve_local(name) if is_local_reference(name) else None
    try:
        config = AutoConfig.from_pretrained(str(local or name), trust_remote_code=load.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise ModelLoadError(f"cannot load the config of {name!r}: {first}") from exc
    return config, local


def load_model(model: LoadConfig | str | os.PathLike[str], **options: Any) -> LoadedModel:
    """Load a causal LM and its tokenizer, and match it to a family spec.

    The family is checked from the config before any weights are read, so an unsupported
    model fails fast.

    Args:
        model: A :class:`LoadConfig`, or a model reference: a local folder, a ``.gguf``
            file (dequantized into a plain model, see :func:`depthprune.gguf_import.load_gguf`)
            or a Hugging Face Hub id.
        **options: :class:`LoadConfig` fields, so that ``load_model(name, dtype="float32")``
            is ``load_model(LoadConfig(name, dtype="float32"))``; with a ``LoadConfig``
            they replace its values.

    Returns:
        The :class:`LoadedModel`, in eval mode.

    Raises:
        InputError: a bad option value.
        ModelLoadError: the path or id cannot be loaded.
        UnsupportedArchitectureError: no family file matches.
    """
    from transformers import AutoModelForCausalLM

    from depthprune.gguf_import import is_gguf_path, load_gguf

    load = as_load_config(model, **options)
    name = load.model
    if is_gguf_path(name):
        if load.device_map is not None:
            raise InputError(
                f"a device map needs safetensors weights, and {name!r} is a GGUF file; convert it first "
                "(depthprune convert-gguf), or use --device"
            )
        return load_gguf(name, load.dtype, load.device, load.attn_implementation, load.load_tokenizer)
    config, local = load_config(load)
    spec = spec_for_config(config)
    if local is not None and not any((local / f).is_file() for f in _WEIGHT_FILES):
        raise ModelLoadError(f"{name!r} has a config.json but no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    kwargs: dict[str, Any] = {"dtype": DTYPES[load.dtype], "trust_remote_code": load.trust_remote_code}
    if load.attn_implementation:
        kwargs["attn_implementation"] = load.attn_implementation
    if load.device_map is not None:
        kwargs["device_map"] = load.device_map
        if load.offload_folder is not None:
            kwargs["offload_folder"] = load.offload_folder
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(local or name), config=config, **kwargs)
    except DepthPruneError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        first = first_line(exc)
        raise ModelLoadError(f"cannot load the weights of {name!r}: {first}") from exc
    if load.device_map is None:
        hf_model.to(load.device)
    hf_model.eval()
    check_model(hf_model, spec)
    from depthprune.distributed import check_same

    check_same("model", f"{name}|{sum(p.numel() for p in hf_model.parameters())}|{hf_model.config.to_json_string()}")
    tokenizer = load_tokenizer_for(name, local, load.trust_remote_code) if load.load_tokenizer else None
    return LoadedModel(model=hf_model, tokenizer=tokenizer, spec=spec, source=name, local_dir=local)


def load_tokenizer_for(name: str, local: Path | None, trust_remote_code: bool = False) -> Any | None:
    """Load the tokenizer stored with a model, or return ``None`` when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(local or name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("no tokenizer loaded for %s: %s", name, first_line(exc))
        return None
