"""Terminal tables and figures of unit scores.

Both take a scores document as :func:`depthprune.scores_file.load_scores` returns it. Scores
follow one convention: a higher score means a more important unit.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from depthprune._fs import atomic_file, check_output
from depthprune.errors import InputError, check_choice
from depthprune.scores_file import metric_span, validate_scores
from depthprune.units import UNIT_KINDS, Unit

logger = logging.getLogger(__name__)


def _metrics(scores: dict[str, Any], metrics: Sequence[str] | None) -> list[str]:
    table = scores["scores"]
    chosen = list(table) if metrics is None else list(dict.fromkeys(metrics))
    for m in chosen:
        check_choice(m, table, "metric")
    if not chosen:
        raise InputError("no metrics to show: the scores document has none")
    return chosen


def _label(scores: dict[str, Any], metric: str) -> str:
    """The metric's name, with its span for a span metric (its value at block.l scores l..l+n-1)."""
    span = metric_span(scores, metric)
    return metric if span is None else f"{metric} (span {span})"


def _model_order(unit: Unit) -> tuple[int, int]:
    return unit.index, UNIT_KINDS.index(unit.kind)


def _units(scores: dict[str, Any], metrics: Sequence[str], kinds: Sequence[str] | None) -> list[Unit]:
    n_layers = scores["n_layers"]
    units = {Unit.parse(name, n_layers) for m in metrics for name in scores["scores"][m]}
    if kinds is not None:
        units = {u for u in units if u.kind in kinds}
    return sorted(units, key=_model_order)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def scores_table(
    scores: dict[str, Any],
    metrics: list[str] | None = None,
    sort_by: str | None = None,
    *,
    kinds: Sequence[str] | None = None,
) -> Table:
    """A rich table with one row per unit and one column per metric.

    Rows are sorted by ``sort_by`` (default: the first metric) ascending, so the least
    important unit comes first; ties and units that the sort metric lacks follow model
    order. The ``rank`` column is that order, from 0 as in ``plan.json``. A value shows as
    ``value ± stderr`` when the document has a standard error for it, and ``-`` where the
    metric has no score for the unit.

    Args:
        scores: A scores document.
        metrics: The metrics to show, in column order (default: all, in document order).
        sort_by: The metric to rank by; shown as the first column if not in ``metrics``.
        kinds: Only show units of these kinds (``block``, ``attn``, ``mlp``).

    Raises:
        InputError: an unknown metric or unit kind.
    """
    validate_scores(scores)
    shown = _metrics(scores, metrics)
    if sort_by is not None:
        _metrics(scores, [sort_by])
        if sort_by not in shown:
            shown.insert(0, sort_by)
    key_metric = sort_by or shown[0]
    if kinds is not None:
        for kind in kinds:
            check_choice(kind, UNIT_KINDS, "unit kind")
    units = _units(scores, shown, kinds)
    key_values = scores["scores"][key_metric]

    def sort_key(item: tuple[int, Unit]) -> tuple[int, float, int]:
        position, unit = item
        value = _number(key_values.get(str(unit)))
        if value is None or math.isnan(value):
            return 1, 0.0, position
        return 0, value, position

    ordered = [u for _, u in sorted(enumerate(units), key=sort_key)]
    table = Table(
        title=f"{scores['model']} ({scores['n_layers']} layers)",
        caption=f"sorted by {key_metric} ascending: least important first (higher = more important)",
    )
    table.add_column("rank", justify="right")
    table.add_column("unit")
    for m in shown:
        table.add_column(_label(scores, m), justify="right")
    stderr = scores.get("stderr", {})
    for rank, unit in enumerate(ordered):
        ranked = _number(key_values.get(str(unit))) is not None
        cells = [str(rank) if ranked else "-", str(unit)]
        for m in shown:
            value = _number(scores["scores"][m].get(str(unit)))
            if value is None:
                cells.append("-")
                continue
            text = f"{value:.4g}"
            se = _number(stderr.get(m, {}).get(str(unit)))
            if se is not None and math.isfinite(se):
                text += f" ± {se:.2g}"
            cells.append(text)
        table.add_row(*cells)
    return table


def heatmap_figsize(n_metrics: int, n_units: int) -> tuple[float, float]:
    """Figure size in inches: about a third of an inch per unit, half an inch per metric."""
    return max(6.0, 1.5 + 0.32 * n_units), max(2.5, 1.6 + 0.45 * n_metrics)


def _normalized_rows(scores: dict[str, Any], metrics: Sequence[str], units: Sequence[Unit]) -> list[list[float]]:
    """Each metric's scores over ``units``, min-max scaled to [0, 1]; NaN where missing."""
    rows = []
    for m in metrics:
        values = scores["scores"][m]
        raw = [_number(values.get(str(u))) for u in units]
        row = [v if v is not None and math.isfinite(v) else math.nan for v in raw]
        finite = [v for v in row if not math.isnan(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        if hi > lo:
            rows.append([(v - lo) / (hi - lo) for v in row])
        else:
            rows.append([v if math.isnan(v) else 0.5 for v in row])
    return rows


def plot_heatmap(scores: dict[str, Any], path: str | os.PathLike[str], metrics: list[str] | None = None) -> Path:
    """Draw a metric x unit heatmap of ``scores`` and write it to ``path``.

    Units run in model order (layer index, then block, attn, mlp). Each metric's row is
    min-max normalized to [0, 1] (a constant row is 0.5), so rows with different scales
    can be compared by rank; missing scores are grey. The format follows the suffix of
    ``path`` (``.png``, ``.pdf``, ``.svg``...). An existing file is replaced; the write is
    atomic.

    Args:
        scores: A scores document.
        path: The image file to write.
        metrics: The metrics to draw, top to bottom (default: all, in document order).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        InputError: an unknown metric, no units, an unsupported suffix, or a missing folder.
    """
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    validate_scores(scores)
    target = check_output(path, force=True)
    shown = _metrics(scores, metrics)
    units = _units(scores, shown, None)
    if not units:
        raise InputError(f"nothing to plot: metrics {', '.join(shown)} have no scored units")
    # Figure() without pyplot: no global state and no interactive backend is touched.
    fig = Figure(figsize=heatmap_figsize(len(shown), len(units)), dpi=100, layout="constrained")
    formats = fig.canvas.get_supported_filetypes()
    fmt = target.suffix.lstrip(".").lower()
    if fmt not in formats:
        raise InputError(
            f"cannot write a figure to {str(target)!r}: unknown suffix {target.suffix!r}; "
            f"expected one of {', '.join('.' + f for f in sorted(formats))}"
        )
    data = np.ma.masked_invalid(np.array(_normalized_rows(scores, shown, units), dtype=float))  # (M, U)
    ax = fig.add_subplot()
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(data, aspect="auto", cmap=colormap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(units)), [str(u) for u in units], rotation=90, fontsize=8)
    ax.set_yticks(range(len(shown)), [_label(scores, m) for m in shown], fontsize=9)
    ax.set_xlabel("unit (model order)")
    ax.set_ylabel("metric")
    ax.set_title(f"{scores['model']} ({scores['n_layers']} layers)", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.05 if len(units) > 20 else 0.08, pad=0.01)
    bar.set_label("score, min-max per metric\n(1 = most important)", fontsize=8)

    with atomic_file(target, force=True) as tmp:
        fig.savefig(tmp, format=fmt)
    logger.info("wrote %s", target)
    return target
