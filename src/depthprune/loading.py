"""Loading models and tokenizers from a local folder, a GGUF file or the Hugging Face Hub.

A path ending in ``.gguf`` that is not a folder goes to :mod:`depthprune.gguf_import`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from torch import nn

from depthprune.architectures import ArchSpec, check_model, spec_for_config
from depthprune.errors import DepthPruneError, ModelLoadError, check_choice, first_line

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


def load_config(name: str, trust_remote_code: bool = False) -> tuple[Any, Path | None]:
    """Load a model's config only (cheap), from a local folder, a GGUF file or the Hub.

    Returns:
        The config and the local folder the model lives in (for a GGUF file, the folder
        holding it), or ``None`` for a Hub id.
    """
    from transformers import AutoConfig

    from depthprune.gguf_import import is_gguf_path, load_gguf_config

    if is_gguf_path(name):
        return load_gguf_config(name), Path(name).expanduser().parent
    local = resolve_local(name) if is_local_reference(name) else None
    try:
        config = AutoConfig.from_pretrained(str(local or name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise ModelLoadError(f"cannot load the config of {name!r}: {first}") from exc
    return config, local


def load_model(
    name: str,
    dtype: DType = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    load_tokenizer: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, and match it to a family spec.

    The family is checked from the config before any weights are read, so an unsupported
    model fails fast.

    Args:
        name: A local model folder, a ``.gguf`` file (dequantized into a plain model, see
            :func:`depthprune.gguf_import.load_gguf`) or a Hugging Face Hub id.
        dtype: ``auto`` keeps the checkpoint's dtype.
        device: Where to put the model.
        trust_remote_code: Allow code from the model repository to run. Off by default.
        attn_implementation: Passed to ``from_pretrained`` (e.g. ``"eager"``).
        load_tokenizer: Also load the tokenizer; a model without one gets ``None``.

    Returns:
        The :class:`LoadedModel`, in eval mode.

    Raises:
        ModelLoadError: the path or id cannot be loaded.
        UnsupportedArchitectureError: no family file matches.
    """
    from transformers import AutoModelForCausalLM

    from depthprune.gguf_import import is_gguf_path, load_gguf

    if is_gguf_path(name):
        return load_gguf(name, dtype, device, attn_implementation, load_tokenizer)
    config, local = load_config(name, trust_remote_code)
    spec = spec_for_config(config)
    if local is not None and not any((local / f).is_file() for f in _WEIGHT_FILES):
        raise ModelLoadError(f"{name!r} has a config.json but no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    check_choice(dtype, DTYPES, "dtype")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local or name), config=config, **kwargs)
    except DepthPruneError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        first = first_line(exc)
        raise ModelLoadError(f"cannot load the weights of {name!r}: {first}") from exc
    model.to(device).eval()
    check_model(model, spec)
    tokenizer = load_tokenizer_for(name, local, trust_remote_code) if load_tokenizer else None
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=name, local_dir=local)


def load_tokenizer_for(name: str, local: Path | None, trust_remote_code: bool = False) -> Any | None:
    """Load the tokenizer stored with a model, or return ``None`` when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(local or name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("no tokenizer loaded for %s: %s", name, first_line(exc))
        return None
