"""``findings.md``: the tables, figures and verdicts of a findings run.

Every number in the document is read from the :class:`~depthprune.findings.Findings` of
the run, and every verdict is computed from those numbers: a claim of the paper that the
numbers do not support is reported as not reproduced.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from depthprune import __version__

if TYPE_CHECKING:
    from depthprune.findings import Findings, FindingsSection

PAPER = "Siddiqui et al. 2024, *A deeper look at depth pruning of LLMs* (arXiv 2407.16286)"


def _label(spec: str) -> str:
    from depthprune.sweep import task_label

    return task_label(spec)


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def _score(point: dict[str, Any], task: str) -> float:
    return float(point["scores"][task]["score"])


def _worse_by(value: float, base: float, higher_is_better: bool) -> float:
    """How much worse ``value`` is than ``base``: a ratio for lower-is-better scores
    (perplexity), a drop in points for higher-is-better ones (accuracy)."""
    return value / base if not higher_is_better else base - value


def _direction(point: dict[str, Any], task: str) -> bool:
    return bool(point["scores"][task].get("higher_is_better", True))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def _plot_curves(path: Path, title: str, series: dict[str, list[tuple[float, dict[str, Any]]]], tasks: list[str], xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for name, points in series.items():
            xs = [x for x, _ in points]
            ys = [_score(p, task) for _, p in points]
            ax.plot(xs, ys, marker="o", label=name)
        if points and not _direction(points[0][1], task):
            ax.set_yscale("log")
        ax.set_title(_label(task), fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from depthprune._fs import atomic_file

    try:
        with atomic_file(path, force=True) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def _f1(found: Findings, out_dir: Path, lines: list[str], verdicts: list[str]) -> None:
    f1 = found.f1
    if not f1:
        return
    tasks = found.tasks
    kinds = list(f1["curves"])
    lines += [
        "## F1. Attention sublayers against MLP sublayers against whole blocks",
        "",
        f"Units of each kind are removed in `{f1['metric']}` order (least important first), "
        f"from 0 up to {max(f1['counts'])} of {f1['n_layers']} "
        f"({max(f1['counts']) / f1['n_layers']:.0%}).",
        "",
        "![F1](f1.png)",
        "",
    ]
    _plot_curves(
        out_dir / "f1.png", f"F1: task scores against the fraction of each unit kind removed ({f1['metric']} order)",
        {k: [(p["fraction"], p) for p in f1["curves"][k]] for k in kinds}, tasks, "fraction of the kind removed",
    )
    header = ["removed"] + [f"{k}: {_label(t)}" for k in kinds for t in tasks]
    rows = []
    for i, k in enumerate(f1["counts"]):
        rows.append([f"{k} ({k / f1['n_layers']:.0%})"] + [_fmt(_score(f1["curves"][kind][i], t)) for kind in kinds for t in tasks])
    lines += _table(header, rows)
    # Verdict: at the largest fraction, is attention removal the cheapest on every task
    # whose differences this slice can resolve?
    last = {kind: f1["curves"][kind][-1] for kind in kinds}
    base = f1["curves"][kinds[0]][0]
    if "attn" in kinds and len(kinds) > 1:
        cheapest, unresolved = [], []
        for t in tasks:
            hib = _direction(base, t)
            cost = {kind: _worse_by(_score(last[kind], t), _score(base, t), hib) for kind in kinds}
            noise = _accuracy_stderr(t, _score(base, t)) if hib else None
            spread = max(cost.values()) - min(cost.values())
            resolved = noise is None or spread > 2 * noise
            if resolved:
                cheapest.append(min(cost, key=cost.get) == "attn")
            else:
                unresolved.append(_label(t))
            if hib:
                parts = [f"{kind} {abs(cost[kind]):.3g} points {'worse' if cost[kind] >= 0 else 'better'}" for kind in kinds]
            else:
                parts = [f"{kind} {cost[kind]:.3g}×" for kind in kinds]
            note = " (perplexity ratio to the unpruned model)" if not hib else " than the unpruned model"
            if noise is not None and not resolved:
                note += f"; the spread is within 2 standard errors (±{noise:.3f}) of this slice: not resolved"
            lines.append(f"- {_label(t)} at {max(f1['counts'])} units removed: " + ", ".join(parts) + note)
        lines.append("")
        ok = bool(cheapest) and all(cheapest)
        scope = "every task it can resolve" + (f" (not {', '.join(unresolved)})" if unresolved else "")
        verdicts.append(
            ("**Reproduced**" if ok else "**Not reproduced**" if cheapest else "**Not resolved**")
            + f" (F1): removing {max(f1['counts'])} attention sublayers is "
            + ("the cheapest of the unit kinds on " + scope + "." if ok else "not the cheapest unit kind on " + scope + "; see the F1 table.")
        )


def _accuracy_stderr(spec: str, p: float) -> float | None:
    """The binomial standard error of an accuracy on the items a task spec scores, or
    ``None`` when the spec does not say how many."""
    from depthprune.evaluate import parse_task

    n = getattr(parse_task(spec).config, "limit", None)
    return math.sqrt(max(p * (1 - p), 1e-12) / n) if n else None


def _static(found: Findings, out_dir: Path, lines: list[str], verdicts: list[str], tasks: list[str]) -> None:
    st = found.static
    if not st:
        return
    metrics = list(st["curves"])
    lines += [
        "## Static metrics (and leave-one-out) as block pruning orders",
        "",
        "Blocks are removed in each metric's order, 0 to "
        f"{max(st['counts'])} blocks.",
        "",
        "![static metrics](static.png)",
        "",
    ]
    _plot_curves(
        out_dir / "static.png", "Each metric's block order: task scores against blocks removed",
        {m: [(p["k"], p) for p in st["curves"][m]] for m in metrics}, tasks, "blocks removed",
    )
    header = ["blocks removed"] + [f"{m}: {_label(t)}" for t in tasks for m in metrics]
    rows = [[str(k)] + [_fmt(_score(st["curves"][m][i], t)) for t in tasks for m in metrics] for i, k in enumerate(st["counts"])]
    lines += _table(header, rows)
    lines.append("Orders (first blocks removed): " + "; ".join(f"`{m}`: {', '.join(st['curves'][m][-1]['removed'])}" for m in metrics))
    lines.append("")
    t = tasks[0]
    hib = _direction(st["curves"][metrics[0]][0], t)
    final = {m: _score(st["curves"][m][-1], t) for m in metrics}
    best = max(final, key=final.get) if hib else min(final, key=final.get)
    worst = min(final, key=final.get) if hib else max(final, key=final.get)
    verdicts.append(
        f"Static metrics: at {max(st['counts'])} blocks removed, the best order on {_label(t)} is `{best}` "
        f"({_fmt(final[best])}) and the worst `{worst}` ({_fmt(final[worst])})."
    )


def _f2(found: Findings, lines: list[str], verdicts: list[str]) -> None:
    f2 = found.f2
    if not f2:
        return
    tasks = found.tasks
    lines += [
        "## F2. Adaptive metrics trade tasks",
        "",
        f"Blocks are ordered by leave-one-out on the calibration loss (`loo_loss`), and by leave-one-out on "
        f"the task `{f2['select_task']}` (its score with each block masked; unpruned: {_fmt(f2['select_baseline'])}). "
        "The selection items should be disjoint from the evaluation items below. Each order is then evaluated "
        "on every task.",
        "",
    ]
    header = ["blocks removed"] + [f"{o}: {_label(t)}" for o in ("by loss", "by task") for t in tasks]
    rows = []
    for r in f2["rows"]:
        rows.append([str(r["k"])] + [_fmt(_score(r[o], t)) for o in ("by_loss", "by_task") for t in tasks])
    lines += _table(header, rows)
    lines.append("Orders: " + "; ".join(f"{o.replace('_', ' ')}: {', '.join(f2['rows'][-1][o]['removed'])}" for o in ("by_loss", "by_task")))
    lines.append("")
    # Verdict per count: does each order win on its own kind of value and lose on the other?
    loss_task = next((t for t in tasks if not _direction(f2["rows"][0]["by_loss"], t)), None)
    task_tasks = [t for t in tasks if _direction(f2["rows"][0]["by_loss"], t)]
    if loss_task and task_tasks:
        trades = 0
        for r in f2["rows"][1:]:
            ppl_loss, ppl_task = _score(r["by_loss"], loss_task), _score(r["by_task"], loss_task)
            acc_loss, acc_task = (sum(_score(r[o], t) for t in task_tasks) for o in ("by_loss", "by_task"))
            trade = ppl_loss <= ppl_task and acc_task >= acc_loss and (ppl_loss < ppl_task or acc_task > acc_loss)
            trades += trade
            lines.append(
                f"- {r['k']} blocks: perplexity by loss {_fmt(ppl_loss)} vs by task {_fmt(ppl_task)}; "
                f"task accuracy by loss {_fmt(acc_loss)} vs by task {_fmt(acc_task)}"
                + (" — a trade" if trade else "")
            )
        lines.append("")
        n = len(f2["rows"]) - 1
        verdicts.append(
            ("**Reproduced**" if trades == n else "**Partly reproduced**" if trades else "**Not reproduced**")
            + f" (F2): the loss order keeps perplexity better while the task order keeps the task better at {trades} of {n} budgets."
        )


def _f3(found: Findings, lines: list[str], verdicts: list[str]) -> None:
    f3 = found.f3
    if not f3 or not f3.get("units"):
        return
    tasks = found.tasks
    lines += [
        "## F3. Emulating a removed block",
        "",
        f"Each unit alone is removed and stood in for; held-out loss on {f3['eval']['n_sequences']} calibration "
        f"sequences not used for fitting ({f3['fit']['n_sequences']} fit sequences of {f3['fit']['seq_len']} tokens).",
        "",
    ]
    header = ["unit", "stand-in", "held-out loss", "Δ loss vs unpruned"] + [_label(t) for t in tasks]
    rows = []
    gains: dict[str, float] = {}
    for name, res in f3["units"].items():
        by_method = {r["method"]: r for r in res["rows"]}
        none = by_method.get("none")
        for method, r in by_method.items():
            rows.append([name, method, _fmt(r["loss"]), _fmt(r["delta_loss"])] + [_fmt(r.get("tasks", {}).get(t, {}).get("score")) for t in tasks])
        if none is not None:
            best = min((r for m, r in by_method.items() if m != "none"), key=lambda r: r["loss"], default=None)
            if best is not None:
                gains[name] = none["loss"] - best["loss"]
                lines_gain = f"- `{name}`: the best stand-in (`{best['method']}`) recovers {gains[name]:.3f} nats of the {none['delta_loss']:.3f} lost by plain removal"
                lines.append(lines_gain)
    lines.append("")
    lines += _table(header, rows)
    if gains:
        helped = all(g > 0 for g in gains.values())
        first = min(gains, key=lambda u: int(u.split(".")[1]))
        most = max(gains, key=gains.get)
        verdicts.append(
            ("**Reproduced**" if helped else "**Not reproduced**")
            + f" (F3): an emulated update {'beats' if helped else 'does not always beat'} plain removal in held-out loss; "
            + f"the gain is largest for `{most}`" + (" (the earliest unit measured)." if most == first else f", not for the earliest unit `{first}`.")
        )


def write_findings_doc(found: Findings, scores: dict[str, Any], section: FindingsSection, out_dir: Path) -> Path:
    """Write ``findings.md`` and its figures into ``out_dir``; return the document's path."""
    lines: list[str] = []
    verdicts: list[str] = []
    cal = scores.get("calibration", {})
    lines += [
        f"# The paper's findings, measured on `{found.model}`",
        "",
        f"This page is written by the `findings` stage of `depthprune run` ({__version__}, "
        f"{_dt.datetime.now(_dt.UTC).date().isoformat()}); every number on it comes from that run's "
        "`findings/findings.json`, and every verdict is computed from those numbers. It checks the claims of "
        f"{PAPER} on this model.",
        "",
    ]
    if section.command:
        lines += ["Reproduce it with:", "", "```bash", section.command, "```", ""]
    lines += [
        f"- Model: `{found.model}`, {found.n_layers} layers; scores from {cal.get('n_sequences', '?')} calibration "
        f"sequences of {cal.get('seq_len', '?')} tokens (`{cal.get('source', '?')}`).",
        "- Tasks measured at every point: " + ", ".join(f"`{t}`" for t in found.tasks) + ".",
        f"- Measurement time: {found.measured_seconds:.0f} s over all points (this call: {found.seconds:.0f} s).",
        "",
        "## Summary",
        "",
        "<!-- verdicts -->",
        "",
    ]
    _f1(found, out_dir, lines, verdicts)
    _static(found, out_dir, lines, verdicts, list(section.static_tasks or found.tasks))
    _f2(found, lines, verdicts)
    _f3(found, lines, verdicts)
    text = "\n".join(lines).replace("<!-- verdicts -->", "\n".join(f"- {v}" for v in verdicts) or "- nothing measured")
    path = out_dir / "findings.md"
    from depthprune._fs import write_text_atomic

    return write_text_atomic(path, text + "\n")
