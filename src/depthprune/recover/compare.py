"""The recovery figure: held-out loss against units removed, for each way of standing in.

For a ranking of units (a plan's order: least important first), the first ``k`` units
are removed for each ``k`` of ``counts``, and the model's loss on held-out sequences is
measured with each method:

- ``none``: plain removal;
- ``bias``, ``lowrank:R``: closed-form emulators (:mod:`depthprune.recover.emulate`), all
  fitted from one pass over the fit split;
- ``learned-bias``, ``learned-lowrank:R``, ``lora:R``: learned baselines
  (:mod:`depthprune.recover.learn`), trained on the same fit split for every ``k``.

Every method sees the same fit and evaluation sequences, so the numbers compare. The
loss is the mean next-token negative log-likelihood over all real tokens of the
evaluation split (perplexity is its exponential).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from depthprune import __version__
from depthprune._fs import atomic_file, check_output, write_json_atomic
from depthprune.architectures import ArchSpec
from depthprune.data import TokenBatches
from depthprune.devices import input_device
from depthprune.errors import InputError
from depthprune.progress import counter
from depthprune.recover.emulate import (
    DEFAULT_RIDGE,
    collect_updates,
    emulate,
    emulator_from_stats,
    parse_stand_in,
)
from depthprune.recover.learn import LearnConfig, lora_recovery, train_emulators
from depthprune.units import ModelLayout, Unit

logger = logging.getLogger(__name__)

_LEARNED_RE = re.compile(r"^(bias|lowrank:[1-9][0-9]*|lora:[1-9][0-9]*)$")


def parse_learned(value: str) -> tuple[str, int]:
    """``"bias"`` -> ``("bias", 0)``, ``"lowrank:8"`` -> ``("lowrank", 8)``, ``"lora:8"`` -> ``("lora", 8)``.

    Raises:
        InputError: anything else.
    """
    text = value.strip() if isinstance(value, str) else value
    if not isinstance(text, str) or not _LEARNED_RE.match(text):
        raise InputError(f"unknown learned method {value!r}; expected bias, lowrank:R or lora:R with R a positive integer")
    kind, _, rank = text.partition(":")
    return kind, int(rank or 0)


@dataclass(frozen=True)
class CompareConfig:
    """What to compare.

    Attributes:
        methods: Closed-form methods: ``none``, ``bias``, ``lowrank:R``.
        learned: Learned baselines: ``bias``, ``lowrank:R``, ``lora:R``.
        counts: Numbers of units removed (the x axis); ``0..len(units)`` when ``None``.
        ridge: Relative ridge of the low-rank fits.
        steps: Training budget of each learned run, in steps (see :class:`LearnConfig`).
        tokens: Training budget in tokens instead.
        lr: Learning rate of the learned baselines.
        batch_size: Sequences per forward pass and per training step.
        seed: Seeds the learned baselines.
        show_progress: Show progress bars on a terminal.
    """

    methods: tuple[str, ...] = ("none", "bias", "lowrank:8")
    learned: tuple[str, ...] = ()
    counts: tuple[int, ...] | None = None
    ridge: float = DEFAULT_RIDGE
    steps: int | None = None
    tokens: int | None = None
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.methods and not self.learned:
            raise InputError("nothing to compare; give at least one of methods (none,bias,lowrank:R) and learned")
        for m in self.methods:
            parse_stand_in(m)
        for m in self.learned:
            parse_learned(m)
        if self.counts is not None:
            bad = [c for c in self.counts if isinstance(c, bool) or not isinstance(c, int) or c < 0]
            if bad or not self.counts:
                raise InputError(f"counts {list(self.counts)!r} are invalid; expected whole numbers >= 0 such as 1,2,4")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch size {self.batch_size!r} is invalid; expected a whole number >= 1")
        self.learn_config("bias")  # validates steps/tokens/lr

    def learn_config(self, learned: str) -> LearnConfig:
        """The :class:`LearnConfig` of one learned baseline."""
        kind, rank = parse_learned(learned)
        return LearnConfig(
            method=kind,  # type: ignore[arg-type]
            rank=rank or 8,
            steps=self.steps,
            tokens=self.tokens,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
            show_progress=self.show_progress,
        )


@dataclass
class CompareResult:
    """Loss against units removed, per method.

    Attributes:
        model: Name of the model.
        units: The ranking, least important first.
        baseline_loss: Held-out loss of the unpruned model.
        rows: One dict per (count, method): ``removed``, ``method``, ``loss``, ``ppl``,
            ``delta_loss`` (over the baseline), and for learned methods ``train_steps``,
            ``train_tokens``, ``train_seconds``.
        fit: Provenance of the fit split.
        eval: Provenance of the evaluation split.
        config: The :class:`CompareConfig` used.
        fit_seconds: Time of the closed-form statistics pass.
    """

    model: str
    units: list[str]
    baseline_loss: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    fit_seconds: float = 0.0

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def loss(self, method: str, removed: int) -> float:
        """The held-out loss of ``method`` with the first ``removed`` units removed."""
        for row in self.rows:
            if row["method"] == method and row["removed"] == removed:
                return row["loss"]
        raise KeyError((method, removed))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "model": self.model,
            "metric": "heldout_loss",
            "units": self.units,
            "baseline_loss": self.baseline_loss,
            "baseline_ppl": math.exp(self.baseline_loss),
            "rows": self.rows,
            "fit": self.fit,
            "eval": self.eval,
            "fit_seconds": self.fit_seconds,
            "config": self.config,
        }


def split_heldout(data: TokenBatches, n_eval: int, seed: int = 0) -> tuple[TokenBatches, TokenBatches]:
    """Split sequences into disjoint fit and evaluation sets (a seeded choice of ``n_eval``).

    Raises:
        InputError: fewer than ``n_eval + 1`` sequences.
    """
    n = len(data)
    if not 1 <= n_eval < n:
        raise InputError(f"cannot hold out {n_eval} of {n} sequences; need 1 <= n_eval < {n}: give more data or a smaller --n-eval")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    eval_idx, fit_idx = perm[:n_eval].sort().values, perm[n_eval:].sort().values
    return subset(data, fit_idx, "fit"), subset(data, eval_idx, "eval")


def subset(data: TokenBatches, idx: torch.Tensor, part: str) -> TokenBatches:
    """The sequences ``idx`` of ``data``, with provenance that names the ``part``."""
    ids = data.input_ids[idx].contiguous()
    info = dataclasses.replace(
        data.info,
        source=f"{data.info.source}#{part}",
        n_sequences=int(ids.shape[0]),
        n_tokens=int(ids.numel()),
        sha256=hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest(),
    )
    return TokenBatches(input_ids=ids, attention_mask=data.attention_mask[idx].contiguous(), info=info)


@torch.no_grad()
def heldout_loss(model: nn.Module, data: TokenBatches, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood over the real tokens of ``data``."""
    device = input_device(model)
    total, count = 0.0, 0
    for ids, mask in data.batches(batch_size):
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        total += float(nll[valid].double().sum())
        count += int(valid.sum())
    if count == 0:
        raise InputError("the evaluation data has no scored tokens; give longer sequences")
    loss = total / count
    if not math.isfinite(loss):
        raise InputError("the held-out loss is not finite: the model's weights or dtype are broken; try --dtype float32")
    return loss


def compare_recovery(
    model: nn.Module,
    units: Sequence[Unit],
    fit_data: TokenBatches,
    eval_data: TokenBatches,
    config: CompareConfig | None = None,
    spec: ArchSpec | None = None,
    model_name: str = "",
    evaluator: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> CompareResult:
    """Measure held-out loss against the number of units removed, for every method.

    Args:
        model: The unpruned model; it is left unchanged.
        units: The ranking, least important first; the first ``k`` are removed.
        fit_data: Sequences that emulators are fitted or trained on.
        eval_data: Held-out sequences that the loss is measured on.
        config: Methods, counts and budgets.
        spec: The family spec; looked up from ``model.config`` when omitted.
        model_name: Recorded in the result.
        evaluator: Also measures anything else (e.g. task scores) of the model as each
            method leaves it; its result is stored in the row as ``tasks``.

    Returns:
        A :class:`CompareResult`.
    """
    config = config or CompareConfig()
    layout = ModelLayout.of(model, spec)
    units = list(dict.fromkeys(units))
    layout.check_units(units)
    counts = sorted(set(config.counts if config.counts is not None else range(len(units) + 1)))
    if counts[-1] > len(units):
        raise InputError(f"cannot remove {counts[-1]} units: the ranking has only {len(units)}; lower --counts")
    bs = config.batch_size
    baseline = heldout_loss(model, eval_data, bs)
    result = CompareResult(
        model=model_name,
        units=[str(u) for u in units],
        baseline_loss=baseline,
        fit=fit_data.info.to_dict(),
        eval=eval_data.info.to_dict(),
        config=dataclasses.asdict(config),
    )
    fitted = [m for m in config.methods if parse_stand_in(m)[0] != "none"]
    need = {u: any(m.startswith("lowrank") for m in fitted) for u in units[: counts[-1]]}
    start = time.perf_counter()
    stats = {}
    if fitted and need:
        stats = collect_updates(model, fit_data, need, spec=layout.spec, batch_size=bs, show_progress=config.show_progress)
    result.fit_seconds = time.perf_counter() - start
    dtype = next(model.parameters()).dtype
    cache: dict[tuple[Unit, str], nn.Module | None] = {}

    def stand_in(unit: Unit, method: str) -> nn.Module | None:
        if (unit, method) not in cache:
            e = emulator_from_stats(stats[unit], method, config.ridge, dtype) if method != "none" else None
            cache[unit, method] = e  # on its layer's device, where its statistics were gathered
        return cache[unit, method]

    unpruned: dict[str, Any] = {}

    def measure(k: int, label: str, learned: Any = None) -> None:
        """Append the row of the model as it is now (``k`` units stood in for by ``label``)."""
        if k == 0:
            loss = baseline
            if evaluator is not None and "tasks" not in unpruned:
                unpruned["tasks"] = evaluator(model)
            extra = unpruned.get("tasks")
        else:
            loss = heldout_loss(model, eval_data, bs)
            extra = evaluator(model) if evaluator is not None else None
        row = _row(k, label, loss, baseline, learned)
        if extra is not None:
            row["tasks"] = extra
        result.rows.append(row)

    total = len(counts) * (len(config.methods) + len(config.learned))
    with counter(total, desc="recovery comparison", disable=not config.show_progress) as bar:
        for k in counts:
            chosen = units[:k]
            for method in config.methods:
                if k == 0:
                    measure(k, method)
                else:
                    with emulate(model, {u: stand_in(u, method) for u in chosen}, layout.spec):
                        measure(k, method)
                bar.update()
            for learned in config.learned:
                lc = config.learn_config(learned)
                if k == 0:
                    measure(k, lc.label)
                elif lc.method == "lora":
                    with lora_recovery(model, chosen, fit_data, lc, layout.spec) as res:
                        measure(k, lc.label, res)
                else:
                    res = train_emulators(model, chosen, fit_data, lc, layout.spec)
                    with emulate(model, res.emulators, layout.spec):  # type: ignore[arg-type]
                        measure(k, lc.label, res)
                bar.update()
    return result


def _row(k: int, method: str, loss: float, baseline: float, learned: Any = None) -> dict[str, Any]:
    row: dict[str, Any] = {"removed": k, "method": method, "loss": loss, "ppl": math.exp(loss), "delta_loss": loss - baseline}
    if learned is not None:
        row.update(train_steps=learned.steps, train_tokens=learned.tokens, train_seconds=learned.seconds)
    return row


# --------------------------------------------------------------------------- output


def comparison_table(result: CompareResult) -> Any:
    """A ``rich`` table: one row per count, one column per method, the held-out loss increase."""
    from rich.table import Table

    table = Table(
        title=f"held-out loss increase vs units removed ({result.model or 'model'}, unpruned loss {result.baseline_loss:.4f})"
    )
    table.add_column("removed", justify="right")
    table.add_column("last unit")
    methods = result.methods
    for m in methods:
        table.add_column(m, justify="right")
    for k in sorted({r["removed"] for r in result.rows}):
        cells = []
        for m in methods:
            try:
                loss = result.loss(m, k)
            except KeyError:
                cells.append("-")
                continue
            cells.append(f"{loss - result.baseline_loss:+.3f}")
        table.add_row(str(k), result.units[k - 1] if k else "-", *cells)
    return table


def plot_comparison(result: CompareResult, path: str | os.PathLike[str]) -> Path:
    """Write the recovery figure (held-out loss against units removed) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in result.methods:
        pts = sorted((r["removed"], r["loss"]) for r in result.rows if r["method"] == method)
        style = "--" if method.startswith(("learned", "lora")) else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3, label=method)
    ax.axhline(result.baseline_loss, color="grey", linewidth=0.8, linestyle=":", label="unpruned")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("units removed")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(result.model or "recovery")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    try:
        with atomic_file(target, force=True) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return target


def write_comparison(
    result: CompareResult, out: str | os.PathLike[str], plot: str | os.PathLike[str] | None = None, force: bool = False
) -> tuple[Path, Path | None]:
    """Write the result as JSON to ``out`` and, when ``plot`` is given, the figure as PNG.

    Raises:
        OutputExistsError: an output exists and ``force`` is false.
    """
    check_output(out, force)
    if plot is not None:
        check_output(plot, force)
    json_path = write_json_atomic(out, result.to_dict(), force=force)
    return json_path, plot_comparison(result, plot) if plot is not None else None
