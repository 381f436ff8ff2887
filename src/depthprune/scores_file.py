"""``scores.json``: reading, checking and fingerprinting the output of ``depthprune score``.

A scores document maps each metric to a value per unit (higher = more important)::

    {"model": "...", "n_layers": 32, "config_sha256": "...", "calibration": {...},
     "scores": {"cosine": {"block.0": 0.91, ...}}, "stderr": {...}, "definitions": {...}}

A span metric's definition has ``"span": n``: its value at ``block.l`` scores blocks
``l..l+n-1``. The document is written by :func:`depthprune.score.write_scores`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from depthprune._fs import read_json
from depthprune.errors import InputError
from depthprune.units import Unit

_SCORES_KEYS = ("model", "n_layers", "scores")


def parse_unit(name: str, n_layers: int, where: str) -> Unit:
    """``Unit.parse``, with the file or document that holds the name in the message.

    Raises:
        InputError: the name is malformed or out of range; the message starts with ``where``.
    """
    try:
        return Unit.parse(name, n_layers)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def validate_scores(doc: Any, where: str = "scores") -> dict[str, Any]:
    """Check the shape of a scores document and return it.

    Required: ``model``, ``n_layers`` (an int >= 1) and ``scores`` (metric -> unit ->
    number, with valid unit names). ``stderr``, ``definitions`` and ``calibration`` are
    optional; when present they must be objects.

    Raises:
        InputError: a key is missing or has the wrong type, or a unit name is invalid.
    """
    if not isinstance(doc, dict):
        raise InputError(f"{where} holds a JSON {type(doc).__name__}; expected an object with keys {', '.join(_SCORES_KEYS)}")
    missing = [k for k in _SCORES_KEYS if k not in doc]
    if missing:
        raise InputError(
            f"{where} has no {', '.join(repr(k) for k in missing)} key; expected the output of depthprune score "
            f"(keys {', '.join(_SCORES_KEYS)})"
        )
    n_layers = doc["n_layers"]
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise InputError(f"{where}: n_layers is {n_layers!r}; expected an integer >= 1")
    for key in ("scores", "stderr", "definitions"):
        table = doc.get(key, {})
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise InputError(f"{where}: {key!r} must map each metric to an object")
    sha = doc.get("config_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise InputError(f"{where}: config_sha256 is {sha!r}; expected the 64 hex digits written by depthprune score")
    if "calibration" in doc and not isinstance(doc["calibration"], (dict, type(None))):
        raise InputError(f"{where}: 'calibration' must be an object")
    for metric, values in doc["scores"].items():
        for name, value in values.items():
            parse_unit(name, n_layers, where)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{where}: score of {metric} for {name} is {value!r}; expected a number")
    return doc


def load_scores(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a ``scores.json`` written by ``depthprune score``.

    Raises:
        InputError: the file is missing, not JSON, or lacks required keys.
    """
    doc = read_json(path, "scores file", "run depthprune score first, or give the path of its scores.json")
    return validate_scores(doc, where=f"scores file {str(path)!r}")


def scores_digest(scores: dict[str, Any]) -> str:
    """SHA-256 of ``scores`` as canonical JSON (sorted keys, no spaces), without timestamps.

    Floats survive a JSON round trip exactly, so a document and the file it was read
    from have the same digest whatever the file's indentation. A creation time
    (``meta.created``, written by older versions) is left out: the same numbers give the
    same digest, so a rerun gives the same plan file.
    """
    meta = scores.get("meta")
    if isinstance(meta, dict) and "created" in meta:
        scores = {**scores, "meta": {k: v for k, v in meta.items() if k != "created"}}
    text = json.dumps(scores, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def metric_span(scores: dict[str, Any], metric: str) -> int | None:
    """The span length of a span metric (its definition has ``"span"``), else ``None``."""
    definition = scores.get("definitions", {}).get(metric) or {}
    span = definition.get("span") if isinstance(definition, dict) else None
    if span is None:
        return None
    if isinstance(span, bool) or not isinstance(span, int) or span < 1:
        raise InputError(f"definition of metric {metric!r} has span {span!r}; expected an integer >= 1")
    return span


__all__ = ["load_scores", "metric_span", "parse_unit", "scores_digest", "validate_scores"]
