"""A self-contained HTML report of a pruning run (images inlined, no network)."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from depthprune import __version__
from depthprune.speed import NO_DIFFERENCE, Spread, compare

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1b1b1b;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}pre{background:#f6f8fa;padding:.8rem;white-space:pre-wrap;word-break:break-all;font-size:.85rem}
.better{color:#0a7a2f}.worse{color:#b3261e}.muted{color:#666;font-size:.85rem}
"""


@dataclass
class ReportData:
    """Everything the report shows; each part is optional.

    Attributes:
        title: Heading of the page.
        model: The source model.
        plan: The ``plan.json`` document.
        before, after: Headline metrics of the original and pruned models, by name.
        sizes: Rows of size figures (parameters, KV-cache bytes per token, ...), each
            ``(label, before, after)``.
        throughput: ``(label, before, after)`` rows of measured tokens/s, each a
            :class:`~depthprune.speed.Spread` over repeats; the change column says "no
            measurable difference" when their ranges overlap.
        images: ``(caption, PNG path)`` pairs: the heatmap, the sweep curves, ...
        commands: The exact commands that reproduce the run.
        notes: Free-text lines.
    """

    title: str
    model: str
    plan: dict[str, Any] | None = None
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    lower_is_better: Sequence[str] = ()
    sizes: list[tuple[str, float, float]] = field(default_factory=list)
    throughput: list[tuple[str, Spread, Spread]] = field(default_factory=list)
    images: list[tuple[str, str | os.PathLike[str]]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:,.4g}" if abs(x) < 1e5 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return _e(x)


def _img(path: str | os.PathLike[str]) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(Path(path).name)}" src="data:image/png;base64,{data}">'


def _ratio_rows(rows: list[tuple[str, float, float]]) -> str:
    out = ["<table><tr><th></th><th>original</th><th>pruned</th><th>pruned / original</th></tr>"]
    for label, a, b in rows:
        ratio = f"{b / a:.3f}" if a else "-"
        out.append(f"<tr><td>{_e(label)}</td><td>{_num(a)}</td><td>{_num(b)}</td><td>{ratio}</td></tr>")
    return "".join(out) + "</table>"


def _speed_cell(s: Spread) -> str:
    return f"{_num(s.median)} <span class=muted>({_num(s.low)}&ndash;{_num(s.high)})</span>"


def _speed_rows(rows: list[tuple[str, Spread, Spread]]) -> str:
    out = ["<table><tr><th></th><th>original</th><th>pruned</th><th>pruned / original</th></tr>"]
    for label, a, b in rows:
        verdict = compare(a, b)
        cls = "" if verdict == NO_DIFFERENCE else " class=better" if b.median > a.median else " class=worse"
        out.append(f"<tr><td>{_e(label)}</td><td>{_speed_cell(a)}</td><td>{_speed_cell(b)}</td><td{cls}>{_e(verdict)}</td></tr>")
    n = min(min(a.n, b.n) for _, a, b in rows)
    out.append(
        f"</table><p class=muted>Median of {n} runs per model, the models taking turns; in brackets the "
        "interquartile range. Where the ranges overlap, the difference is within this machine's noise "
        f"and is reported as {NO_DIFFERENCE}.</p>"
    )
    return "".join(out)


def render(data: ReportData) -> str:
    """The report as one HTML string."""
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(data.title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(data.title)}</h1><p class=muted>model: {_e(data.model)} · depthprune {__version__}</p>",
    ]
    if data.plan:
        parts.append("<h2>Plan</h2>")
        prov = data.plan.get("provenance") or {}
        if prov:
            parts.append(f"<p>by metric <b>{_e(prov.get('metric'))}</b>, units {_e(prov.get('units'))}, budget {_e(prov.get('budget'))}</p>")
        parts.append("<table><tr><th>rank</th><th>unit</th><th>score</th><th>replace</th></tr>")
        for i, entry in enumerate(data.plan.get("remove", [])):
            parts.append(
                f"<tr><td>{entry.get('rank', i)}</td><td>{_e(entry['unit'])}</td><td>{_num(entry.get('score', ''))}</td>"
                f"<td>{_e(entry.get('replace', 'none'))}</td></tr>"
            )
        parts.append("</table>")
    if data.before or data.after:
        parts.append("<h2>Quality before and after</h2><table><tr><th>metric</th><th>original</th><th>pruned</th><th>change</th></tr>")
        for name in dict.fromkeys([*data.before, *data.after]):
            a, b = data.before.get(name), data.after.get(name)
            change, cls = "-", ""
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                change = f"{b - a:+.4g}"
                worse = (b > a) if name in data.lower_is_better else (b < a)
                cls = " class=worse" if worse and b != a else " class=better"
            parts.append(f"<tr><td>{_e(name)}</td><td>{_num(a) if a is not None else '-'}</td><td>{_num(b) if b is not None else '-'}</td><td{cls}>{change}</td></tr>")
        parts.append("</table>")
    if data.sizes:
        parts.append("<h2>Size</h2>" + _ratio_rows(data.sizes))
    if data.throughput:
        parts.append("<h2>Speed (measured)</h2>" + _speed_rows(data.throughput))
    for caption, path in data.images:
        parts.append(f"<h2>{_e(caption)}</h2>{_img(path)}")
    if data.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in data.notes) + "</ul>")
    if data.commands:
        parts.append("<h2>Reproduce</h2><pre>" + _e("\n".join(data.commands)) + "</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(data: ReportData, path: str | os.PathLike[str]) -> Path:
    """Write the report atomically."""
    from depthprune._fs import write_text_atomic

    return write_text_atomic(path, render(data))
