"""Which model an artifact was made for: a fingerprint of its config, checked by consumers.

``scores.json`` and ``plan.json`` record ``config_sha256`` (and ``n_layers``) of the model
they were made from. A stage that reads one together with a model (prune, sweep,
recover-compare, the findings) refuses a mismatch, because unit names such as ``block.3``
exist in every model and would otherwise be applied to the wrong one without a word.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from depthprune.errors import InputError

logger = logging.getLogger(__name__)

# Keys that describe how a config was loaded or saved, not the model: the same checkpoint
# loaded in another dtype, with another attention kernel, from a .gguf file (with a
# quantization_config) or from the folder converted from it, has the same fingerprint.
VOLATILE_KEYS = frozenset(
    {
        "transformers_version",
        "torch_dtype",
        "dtype",
        "quantization_config",
        "use_cache",
        "attn_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


def config_sha256(config: Any) -> str:
    """SHA-256 of a model config as canonical JSON, without volatile keys.

    The config's differences from its class defaults (``to_diff_dict``), minus
    :data:`VOLATILE_KEYS` and private keys (``_name_or_path``, ``_commit_hash``, ...), as
    JSON with sorted keys and no spaces.

    Args:
        config: A transformers ``PretrainedConfig``, or a plain mapping.
    """
    doc = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
    kept = {k: v for k, v in doc.items() if k not in VOLATILE_KEYS and not str(k).startswith("_")}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_made_for(doc: dict[str, Any], config: Any, n_layers: int, where: str, model: str, fix: str) -> None:
    """Refuse a scores or plan document made for another model than ``config``'s.

    A document without ``config_sha256`` (written before depthprune recorded it, or a plan
    written by hand) is checked on ``n_layers`` alone; for one that carries ``provenance``
    or ``scores`` (made by depthprune) a warning says so.

    Args:
        doc: The scores or plan document.
        config: The config of the model it is about to be applied to.
        n_layers: That model's number of layers.
        where: The document, for messages (``"scores file 's.json'"``).
        model: The model's reference, for messages.
        fix: What to do on a mismatch (``"score this model first"``).

    Raises:
        InputError: the document records another layer count or config fingerprint.
    """
    made_layers = doc.get("n_layers")
    made_sha = doc.get("config_sha256")
    here = config_sha256(config)
    made_for = f"{doc['model']!r}, " if isinstance(doc.get("model"), str) and doc["model"] else ""
    made_for += f"a model with {made_layers if made_layers is not None else 'unrecorded'} layers"
    made_for += f" (config sha256 {made_sha[:12]})" if isinstance(made_sha, str) else ""
    this = f"{model!r} with {n_layers} layers (config sha256 {here[:12]})"
    if made_layers is not None and made_layers != n_layers:
        raise InputError(f"{where} was made for {made_for}, not for {this}; {fix}")
    if made_sha is None:
        if "provenance" in doc or "scores" in doc:
            logger.warning(
                "%s records no config_sha256 (written by an older depthprune), so it cannot be checked to be "
                "about %r beyond its layer count; %s to be sure",
                where, model, fix,
            )
        return
    if made_sha != here:
        raise InputError(f"{where} was made for {made_for}, not for {this}; {fix}")


__all__ = ["VOLATILE_KEYS", "check_made_for", "config_sha256"]
