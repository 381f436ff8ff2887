"""Writing pruned models as Hugging Face folders with safetensors weights."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from depthprune import __version__
from depthprune._fs import atomic_dir, check_free_disk
from depthprune.errors import InputError, check_choice
from depthprune.nemotron_nas import nemotron_nas_config, write_nemotron_nas

if TYPE_CHECKING:
    from depthprune.shard_prune import RewritePlan

logger = logging.getLogger(__name__)

MANIFEST = "depthprune.json"
ExportFormat = Literal["hf", "nemotron-nas", "gguf"]
EXPORT_FORMATS: tuple[str, ...] = ("hf", "nemotron-nas", "gguf")


_NEEDS_DEPTHPRUNE = """\
---
library_name: transformers
tags: [depthprune]
---
# A depthprune export ({family})

Some attention or MLP sublayers of this model were removed or replaced by small emulation
modules, which no standard transformers architecture can express. It loads only with
depthprune installed:

```python
import depthprune
model = depthprune.load("path/to/this/folder")
# or, after `import depthprune`: AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

The weights are in `model.depthprune.safetensors`, so the unpruned family class cannot
pick them up by mistake. `depthprune.json` lists what was removed.
"""


def export(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    manifest: dict[str, Any] | None = None,
    force: bool = False,
    source_dir: Path | None = None,
    export_format: ExportFormat = "hf",
    gguf_type: str = "f32",
    sources: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and its tokenizer) to ``out`` atomically.

    The folder is built in a temporary sibling and renamed at the end, so a failure leaves
    nothing half-written and an existing ``out`` untouched.

    With ``export_format="hf"`` the model is saved with ``save_pretrained``: a standard
    checkpoint for a block-pruned model, or a ``depthprune_<family>`` checkpoint for a
    model made by :func:`depthprune.pruned_classes.to_depthpruned_` (loadable with
    ``depthprune.load`` or, after ``import depthprune``, ``AutoModelForCausalLM``).

    With ``export_format="nemotron-nas"`` (families whose architecture file allows it, no
    emulators) the config is written in the DeciLM / "nemotron-nas" layout that vLLM's
    ``DeciLMForCausalLM`` serves: ``block_configs`` with ``no_op`` attention and FFN
    entries (see :mod:`depthprune.nemotron_nas`).

    With ``export_format="gguf"`` (Llama-layout families, no emulators) ``out`` is one
    ``.gguf`` file that llama.cpp runs, with the tokenizer and the manifest inside it (see
    :mod:`depthprune.gguf_export`).

    Args:
        model: The model to save; weights are written as safetensors.
        out: The output folder.
        tokenizer: Saved beside the model when given.
        manifest: Extra content of ``depthprune.json`` (source, removed units, index map...).
        force: Replace an existing ``out``.
        source_dir: The local folder the model was loaded from; refused as ``out``.
        export_format: ``hf``, ``nemotron-nas`` or ``gguf``.
        gguf_type: ``f32``, ``f16`` or ``bf16``: the type of the matrices in a GGUF export.
        sources: ``models`` and ``inputs`` the caller read, refused as or around ``out``
            (see :func:`depthprune._fs.check_target`).

    Returns:
        The output folder.

    Raises:
        InputError: ``out`` is the source folder, or the model cannot be written in
            ``export_format``.
    """
    out_path = Path(out)
    sources = dict(sources or {})
    sources["models"] = [*sources.get("models", ()), source_dir]
    check_choice(export_format, EXPORT_FORMATS, "export format")
    body = {
        "depthprune_version": __version__,
        "format": export_format,
        **(manifest or {}),
    }
    if export_format == "gguf":
        from depthprune.gguf_export import write_gguf

        if tokenizer is None:
            raise InputError("the gguf format embeds the tokenizer, but the model has none; save one beside the model")
        return write_gguf(
            model, out_path, tokenizer=tokenizer, gguf_type=gguf_type, manifest=body, force=force, sources=sources
        )
    nas_config = nemotron_nas_config(model) if export_format == "nemotron-nas" else None
    check_free_disk(out_path.absolute().parent, _checkpoint_bytes(model), "write elsewhere with -o")
    from depthprune.pruned_classes import WEIGHTS_VARIANT, is_depthpruned

    depthpruned = is_depthpruned(model) and export_format == "hf"
    with atomic_dir(out_path, force, **sources) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, variant=WEIGHTS_VARIANT if depthpruned else None)
        _write_beside_weights(tmp, model.config, depthpruned, tokenizer, body, nas_config)
    logger.info("wrote %s", out_path)
    return out_path


def _write_beside_weights(
    tmp: Path,
    config: Any,
    depthpruned: bool,
    tokenizer: Any | None,
    body: dict[str, Any],
    nas_config: dict[str, Any] | None = None,
) -> None:
    """The files of an export other than weights and config: README, tokenizer, manifest ``body``."""
    if depthpruned:
        (tmp / "README.md").write_text(_NEEDS_DEPTHPRUNE.format(family=getattr(config, "model_type", "")), encoding="utf-8")
    if nas_config is not None:
        write_nemotron_nas(tmp, nas_config)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / MANIFEST).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def export_rewritten(
    plan: RewritePlan,
    out: str | os.PathLike[str],
    *,
    dtype: Any | None = None,
    tokenizer: Any | None = None,
    generation_config: Any | None = None,
    manifest: dict[str, Any] | None = None,
    force: bool = False,
    sources: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint pruned on disk (see :mod:`depthprune.shard_prune`) to ``out`` atomically.

    The folder holds what :func:`export` writes for the same model pruned in memory: the
    same tensors (names, dtypes, bytes), the pruned config, generation config, tokenizer
    and ``depthprune.json``, with the weights copied shard by shard instead of loaded.

    Args:
        plan: From :func:`depthprune.shard_prune.plan_rewrite`.
        out: The output folder.
        dtype: A torch dtype for floating-point weights, or ``None`` to keep the checkpoint's.
        tokenizer: Saved beside the model when given.
        generation_config: Saved beside the model when given.
        manifest: Extra content of ``depthprune.json``.
        force: Replace an existing ``out``.
        sources: ``models`` and ``inputs`` that ``out`` must not overlap (see
            :func:`depthprune._fs.check_target`).

    Returns:
        The output folder.
    """
    from depthprune.pruned_classes import WEIGHTS_VARIANT
    from depthprune.shard_prune import write_rewritten

    out_path = Path(out)
    body = {"depthprune_version": __version__, "format": "hf", **(manifest or {})}
    check_free_disk(out_path.absolute().parent, plan.output_bytes() + (1 << 20), "write elsewhere with -o")
    with atomic_dir(out_path, force, **(sources or {})) as tmp:
        write_rewritten(plan, tmp, dtype, WEIGHTS_VARIANT if plan.depthpruned else None)
        config = plan.skeleton.config
        # What save_pretrained records about the model object it saves.
        config.architectures = [type(plan.skeleton).__name__]
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        _write_beside_weights(tmp, config, plan.depthpruned, tokenizer, body)
    logger.info("wrote %s without loading the model", out_path)
    return out_path

def _checkpoint_bytes(model: nn.Module) -> int:
    """An upper estimate of a safetensors checkpoint's size: each tensor once, plus 1 MiB."""
    seen: set[int] = set()
    total = 1 << 20
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size() + 256
    return total


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the ``depthprune.json`` of an exported folder, or ``None`` if it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
