"""Loading models and tokenizers from a local folder, a GGUF file or the Hugging Face Hub.

A path ending in ``.gguf`` that is not a folder goes to :mod:`depthprune.gguf_import`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from torch import nn

from depthprune.architectures import ArchSpec, check_model, spec_for_config
from depthprune.devices import check_device_map
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
# Weight files transformers loads from a folder, all safetensors.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    # depthprune exports (see depthprune.pruned_classes.WEIGHTS_VARIANT)
    "model.depthprune.safetensors",
    "model.safetensors.index.depthprune.json",
)
# Pickle-format weights (torch.save, PyTorch Lightning, transformers' pytorch_model*.bin
# shards and their index): loading one can run any code that the file holds.
_PICKLE_WEIGHTS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")


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


def check_device(device: str) -> str:
    """Return ``device`` if torch can place tensors there on this machine.

    Raises:
        InputError: not a torch device name (``gpu``), or a device this machine lacks
            (``cuda`` without CUDA, ``cuda:7`` with fewer GPUs).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a torch device; expected e.g. cpu, cuda or cuda:0") from None
    if dev.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise InputError(f"device {device!r} is not available on this machine (torch finds no {dev.type}); use --device cpu")
    count = getattr(backend, "device_count", None)
    n = count() if count is not None else 1
    if dev.index is not None and dev.index >= n:
        raise InputError(
            f"device {device!r} is not available on this machine: it has {n} {dev.type} device{'s' if n != 1 else ''} "
            f"({dev.type}:0..{dev.type}:{n - 1})"
        )
    return device


def check_weight_files(folder: Path, name: str) -> None:
    """Refuse a model folder whose weights are pickles, before anything reads them.

    A folder with safetensors weights loads from those alone (``use_safetensors=True``),
    so a pickle beside them is never opened; one with only pickle weights is refused.

    Raises:
        ModelLoadError: the folder has no safetensors weights; the message names the
            pickle files when there are some.
    """
    if any((folder / f).is_file() for f in _WEIGHT_FILES) or any(folder.glob("model-*.safetensors")):
        return
    pickles = sorted(
        {p.name for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern) if p.is_file() and p.name not in _NOT_WEIGHTS}
    )
    if pickles:
        shown = ", ".join(pickles[:3]) + (f" and {len(pickles) - 3} more" if len(pickles) > 3 else "")
        raise ModelLoadError(
            f"{name!r} holds pickle weights ({shown}), which depthprune never loads because unpickling can run code; "
            "convert them to safetensors (model.safetensors, e.g. save_pretrained(..., safe_serialization=True) "
            "in an environment you trust)"
        )
    raise ModelLoadError(f"{name!r} has a config.json but no weights (expected one of {', '.join(_WEIGHT_FILES)})")


def check_loading_info(info: dict[str, Any], name: str) -> None:
    """Refuse a load whose weights do not match the model the config describes.

    transformers initialises missing weights randomly and drops unexpected ones, so a
    ``config.json`` that claims 8 layers over weights of 5 would load and run, wrongly.
    Tied weights (``lm_head`` tied to the embedding) are not reported missing.

    Args:
        info: The ``loading_info`` of ``from_pretrained(..., output_loading_info=True)``.
        name: The model reference, for the message.

    Raises:
        ModelLoadError: a weight is missing, unexpected or of the wrong shape.
    """
    problems = []
    for key, what in (
        ("missing_keys", "missing from the weights (they would be initialised randomly)"),
        ("unexpected_keys", "in the weights but not in the model"),
        ("mismatched_keys", "of another shape than the config implies"),
    ):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} weight{'s' if len(keys) != 1 else ''} {what}: {shown}")
    if problems:
        raise ModelLoadError(
            f"the weights of {name!r} do not match its config.json ({'; '.join(problems)}); "
            "check that config.json belongs to these weights (e.g. num_hidden_layers)"
        )


@contextlib.contextmanager
def quiet_loading_report() -> Iterator[None]:
    """Drop transformers' multi-line load report; :func:`check_loading_info` words it in one line.

    ``from_pretrained`` logs the report through ``transformers.modeling_utils``' logger.
    A filter, not the logger's level: transformers runs extra checks (and warns) when that
    level is raised.
    """
    logger_ = logging.getLogger("transformers.modeling_utils")

    def drop_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    logger_.addFilter(drop_report)
    try:
        yield
    finally:
        logger_.removeFilter(drop_report)


def from_pretrained_checked(where: str, name: str, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` that refuses pickles and mismatched weights.

    Every load of a causal LM goes through here. A local folder's weight files are
    checked first (:func:`check_weight_files`); safetensors are required
    (``use_safetensors=True``) except for a GGUF file (``gguf_file`` in ``kwargs``); and
    the loading report must show every weight matched (:func:`check_loading_info`).

    Args:
        where: The folder (or Hub id) passed to ``from_pretrained``.
        name: The model reference the user gave, for messages.
        **kwargs: Passed to ``from_pretrained``.

    Raises:
        ModelLoadError: pickle weights, weights that do not match the config, or any
            error transformers raises while loading.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(where).expanduser()
    if "gguf_file" not in kwargs:
        if folder.is_dir():
            check_weight_files(folder, name)
        kwargs["use_safetensors"] = True
    # Shape mismatches are reported, not raised, so that check_loading_info words them.
    kwargs.setdefault("ignore_mismatched_sizes", True)
    try:
        with quiet_loading_report():
            model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True, **kwargs)
    except DepthPruneError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(f"cannot load the weights of {name!r}: {first_line(exc)}") from exc
    check_loading_info(info, name)
    return model


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
    kwargs: dict[str, Any] = {"dtype": DTYPES[load.dtype], "trust_remote_code": load.trust_remote_code}
    if load.attn_implementation:
        kwargs["attn_implementation"] = load.attn_implementation
    if load.device_map is not None:
        kwargs["device_map"] = load.device_map
        if load.offload_folder is not None:
            kwargs["offload_folder"] = load.offload_folder
    hf_model = from_pretrained_checked(str(local or name), name, config=config, **kwargs)
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
