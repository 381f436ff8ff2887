"""A model skeleton on the meta device whose parts are read from safetensors files on demand.

The skeleton is the model's own class built under ``accelerate.init_empty_weights``:
parameters live on the meta device (no memory), buffers (rotary frequencies, masks) are
real. :meth:`LazyCheckpoint.load_` reads a submodule's tensors from the memory-mapped
safetensors files and puts them in place with ``accelerate``'s
``set_module_tensor_to_device``; :meth:`LazyCheckpoint.free_` sends them back to meta.
Each call opens the files it needs and closes them when done, so the mapped pages of a
layer stop counting against the process once the layer is loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from depthprune.architectures import (
    ArchSpec,
    check_model,
    get_submodule,
    spec_for_config,
)
from depthprune.errors import CheckpointError, InputError, ModelLoadError, first_line

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file.

    Raises:
        ModelLoadError: the folder holds no safetensors checkpoint.
        CheckpointError: the index or a file is malformed.
    """
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {first_line(exc)}") from exc
        return {str(k): folder / str(v) for k, v in weight_map.items()}
    single = folder / SINGLE
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{single} is not a readable safetensors file: {first_line(exc)}") from exc
    raise ModelLoadError(
        f"{str(folder)!r} has no {SINGLE} or {INDEX}; streamed execution reads safetensors checkpoints "
        "(save the model with save_pretrained, or convert it)"
    )


def _dtype_of(config: Any, dtype: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


@dataclass
class LazyCheckpoint:
    """A meta-device model skeleton and the safetensors files its tensors come from.

    Attributes:
        model: The causal LM skeleton (parameters on meta until loaded), in eval mode.
        spec: Its family spec.
        files: Checkpoint tensor name -> file.
        dtype: The dtype tensors are cast to when loaded.
        device: Where loaded tensors go.
        source: The model folder.
    """

    model: nn.Module
    spec: ArchSpec
    files: dict[str, Path]
    dtype: torch.dtype
    device: torch.device
    source: str
    _aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
             attn_implementation: str | None = None) -> LazyCheckpoint:
        """Build the skeleton of the model in ``folder`` without reading any weights.

        Raises:
            InputError: a GGUF file (it must be converted to safetensors first).
            ModelLoadError: not a local folder with a safetensors checkpoint.
        """
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from depthprune.gguf_import import is_gguf_path
        from depthprune.loading import load_config, resolve_local

        name = str(folder)
        if is_gguf_path(name):
            raise InputError(
                f"{name!r} is a GGUF file; streamed execution reads safetensors shards: convert it first with "
                "`depthprune convert-gguf FILE -o FOLDER` and pass the folder"
            )
        local = resolve_local(name) if Path(name).expanduser().exists() else None
        if local is None:
            raise ModelLoadError(f"{name!r} is not a local model folder; streamed execution reads a local safetensors checkpoint")
        config, _ = load_config(name, trust_remote_code=trust_remote_code)
        spec = spec_for_config(config)
        files = checkpoint_files(local)
        kwargs: dict[str, Any] = {"dtype": _dtype_of(config, dtype), "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        model.eval()
        check_model(model, spec)
        aliases = dict(getattr(model, "all_tied_weights_keys", None) or {})
        ckpt = cls(model, spec, files, kwargs["dtype"], torch.device(device), str(local), aliases)
        ckpt._check_names()
        return ckpt

    # -- names ---------------------------------------------------------------------------

    def _key(self, name: str) -> str | None:
        """The checkpoint tensor that holds parameter ``name`` (a tied one reads its source)."""
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        for candidate in (name, self._aliases.get(name)):
            if candidate is None:
                continue
            if candidate in self.files:
                return candidate
            # Older checkpoints store the base model's tensors without its prefix (GPT-2's "h.0...").
            if prefix and candidate.startswith(prefix + ".") and candidate[len(prefix) + 1 :] in self.files:
                return candidate[len(prefix) + 1 :]
        return None

    def _check_names(self) -> None:
        missing = [n for n, _ in self.model.named_parameters(remove_duplicate=False) if self._key(n) is None]
        if missing:
            raise CheckpointError(
                f"{self.source}: {len(missing)} parameters are not in the checkpoint (first: {missing[0]!r}); "
                "streamed execution needs a checkpoint whose tensor names match the model (as save_pretrained writes)"
            )

    def parameter_names(self, module: nn.Module) -> list[str]:
        """Full parameter names (in the whole model) of ``module``'s parameters."""
        prefix = self._prefix(module)
        return [f"{prefix}{n}" for n, _ in module.named_parameters(remove_duplicate=False)]

    def _prefix(self, module: nn.Module) -> str:
        for name, m in self.model.named_modules(remove_duplicate=False):
            if m is module:
                return f"{name}." if name else ""
        raise ValueError(f"{type(module).__name__} is not part of the model")

    def nbytes(self, names: Iterable[str]) -> int:
        """Bytes that the named parameters take once loaded."""
        size = torch.empty((), dtype=self.dtype).element_size()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return sum(params[n].numel() * size for n in names)

    # -- loading ---------------------------------------------------------------------------

    def load_(self, names: Iterable[str]) -> None:
        """Read the named parameters from the checkpoint (memory-mapped) into the model."""
        from accelerate.utils import set_module_tensor_to_device

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name in names:
            key = self._key(name)
            if key is None:  # checked in open(); a model changed since would land here
                raise CheckpointError(f"{self.source}: parameter {name!r} is not in the checkpoint")
            by_file.setdefault(self.files[key], []).append((name, key))
        for path, pairs in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name, key in pairs:
                        value = f.get_tensor(key)
                        set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=self.dtype)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from exc

    def read_rows(self, names: Iterable[str], start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows ``[start, stop)`` (first dimension) of the named parameters, read from the
        memory-mapped checkpoint without reading the rest, in this checkpoint's dtype and device.

        Raises:
            CheckpointError: a file cannot be read.
        """
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name in names:
            key = self._key(name)
            if key is None:
                raise CheckpointError(f"{self.source}: parameter {name!r} is not in the checkpoint")
            by_file.setdefault(self.files[key], []).append((name, key))
        out: dict[str, torch.Tensor] = {}
        for path, pairs in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name, key in pairs:
                        out[name] = f.get_slice(key)[start:stop].to(self.device, self.dtype)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from exc
        return out

    def free_(self, names: Iterable[str]) -> None:
        """Send the named parameters back to the meta device."""
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(self.model, name, "meta")

    # -- parts -----------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        return get_submodule(self.model, self.spec.layers)  # type: ignore[return-value]

    def shell_names(self, part: str) -> list[str]:
        """Parameters outside the decoder layers that a stage needs.

        Args:
            part: ``input`` (everything up to the first layer: no output embeddings unless
                tied) or ``output`` (everything after the last layer: no input embeddings).
        """
        layer_names = {n for layer in self.layers for n in self.parameter_names(layer)}
        skip_module = self.model.get_output_embeddings() if part == "input" else self.model.get_input_embeddings()
        skip = set(self.parameter_names(skip_module)) if skip_module is not None else set()
        return [n for n, _ in self.model.named_parameters(remove_duplicate=False) if n not in layer_names and n not in skip]
