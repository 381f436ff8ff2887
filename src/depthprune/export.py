"""Writing pruned models as Hugging Face folders with safetensors weights."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from depthprune import __version__
from depthprune._fs import atomic_dir
from depthprune.errors import InputError

logger = logging.getLogger(__name__)

MANIFEST = "depthprune.json"


def export(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    manifest: dict[str, Any] | None = None,
    force: bool = False,
    source_dir: Path | None = None,
) -> Path:
    """Write ``model`` (and its tokenizer) to ``out`` atomically.

    The folder is built in a temporary sibling and renamed at the end, so a failure leaves
    nothing half-written and an existing ``out`` untouched.

    Args:
        model: The model to save; weights are written as safetensors.
        out: The output folder.
        tokenizer: Saved beside the model when given.
        manifest: Extra content of ``depthprune.json`` (source, removed units, index map...).
        force: Replace an existing ``out``.
        source_dir: The local folder the model was loaded from; refused as ``out``.

    Returns:
        The output folder.
    """
    out_path = Path(out)
    if source_dir is not None and out_path.resolve() == Path(source_dir).resolve():
        raise InputError(f"refusing to write into the source model folder {str(source_dir)!r}; choose another -o")
    with atomic_dir(out_path, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        body = {
            "depthprune_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **(manifest or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", out_path)
    return out_path


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the ``depthprune.json`` of an exported folder, or ``None`` if it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
