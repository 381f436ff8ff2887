"""The stages that run layer-streamed: static metrics, leave-one-out and perplexity.

Each gives the same numbers as its in-memory counterpart (it reuses the same statistics
code: :class:`~depthprune.score.static.StaticCollector`,
:func:`~depthprune.score.adaptive.add_loo_stats`, :class:`~depthprune.evaluate.perplexity.WindowBatch`);
only the order of work changes: all batches pass a layer before the next one is read.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from depthprune.data import TokenBatches
from depthprune.errors import InputError
from depthprune.evaluate.perplexity import PerplexityConfig, WindowBatch, perplexity
from depthprune.progress import counter
from depthprune.score import ScoreConfig, ScoreResult, _definition
from depthprune.score.adaptive import add_loo_stats, loo_reference
from depthprune.score.registry import MetricTables, parse_metrics, stats_table
from depthprune.score.static import RunningStats, StaticCollector
from depthprune.streamed.runner import Batch, StreamedModel, branch_of
from depthprune.units import Unit, all_units

logger = logging.getLogger(__name__)

LOO_METRICS = ("loo_loss", "loo_kl")


def _batch_bytes(streamed: StreamedModel, batches: Sequence[Batch]) -> int:
    size = torch.empty((), dtype=streamed.ckpt.dtype).element_size()
    return max(int(ids.numel()) for ids, _ in batches) * streamed.hidden_size * size


def check_stream_metrics(config: ScoreConfig) -> None:
    """Refuse, in one line, the metrics that streamed scoring does not compute.

    Raises:
        InputError: an adaptive metric other than leave-one-out, or ``angular_span`` over
            more than one block.
    """
    for m in parse_metrics(list(config.metrics)):
        if m.kind == "adaptive" and m.name not in LOO_METRICS:
            raise InputError(
                f"metric {m.name!r} is not supported with --stream; streamed scoring computes the static metrics "
                f"and {', '.join(LOO_METRICS)} (run {m.name} without --stream)"
            )
    if "angular_span" in config.metrics and config.span > 1:
        raise InputError("angular_span with --span > 1 is not supported with --stream; use --span 1 or drop --stream")


@contextlib.contextmanager
def _hooked(collector: StaticCollector, i: int, batch: Batch) -> Iterator[None]:
    collector.set_tokens(batch[1])
    handles = collector.attach_layer(i)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def score_streamed(
    streamed: StreamedModel, data: TokenBatches, config: ScoreConfig | None = None, model_name: str = ""
) -> ScoreResult:
    """:func:`depthprune.score.score` for a streamed model: static and leave-one-out metrics in one pass.

    The full model's run of each layer feeds the static metrics; each leave-one-out
    candidate is a branch that splits off the full model at its unit's layer. The LM head
    runs at the end, ``head_rows`` sequences at a time.

    Raises:
        InputError: a metric streamed scoring does not compute (see :func:`check_stream_metrics`).
    """
    config = config or ScoreConfig()
    check_stream_metrics(config)
    metrics = parse_metrics(list(config.metrics))
    layout = streamed.layout
    units = all_units(layout.n_layers, config.units)
    batches = [(ids, mask) for ids, mask in data.batches(config.batch_size)]
    static = [m for m in metrics if m.kind == "static"]
    loo = [m.name for m in metrics if m.name in LOO_METRICS]
    collector = StaticCollector(layout, units, static, config.last_token_only, config.span) if static else None
    on_trunk = (lambda i, b, batch: _hooked(collector, i, batch)) if collector is not None else None
    branches = [frozenset(), *(branch_of([u]) for u in units)] if loo else []
    scores: dict[str, dict[str, float | None]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    cost: dict[str, int] = {}
    with streamed.store(_batch_bytes(streamed, batches)) as store:
        states = streamed.run(batches, branches, store, on_trunk, show_progress=config.show_progress)
        if collector is not None:
            for m in static:
                scores[m.name], stderr[m.name] = stats_table(collector.stats, m.name)
        if loo:
            stats = _loo_head(streamed, batches, units, states, store, loo, config.show_progress)
            tables = MetricTables.from_stats(stats, loo, {})
            scores.update(tables.scores)
            stderr.update(tables.stderr)
        cost["stream_layer_reads"] = streamed.layer_reads
        cost["stream_spilled_bytes"] = store.spilled_bytes
    return ScoreResult(
        model=model_name,
        family=layout.spec.family,
        n_layers=layout.n_layers,
        calibration=data.info,
        scores={m.name: scores[m.name] for m in metrics},
        stderr={m.name: stderr[m.name] for m in metrics},
        definitions={m.name: {**_definition(m, config), "execution": "layer-streamed"} for m in metrics},
        seed=config.seed,
        cost=cost,
    )


@torch.no_grad()
def _loo_head(
    streamed: StreamedModel,
    batches: Sequence[Batch],
    units: list[Unit],
    states: dict[frozenset[Unit], int],
    store: Any,
    metrics: list[str],
    show_progress: bool,
) -> dict[tuple[str, Unit], RunningStats]:
    """The leave-one-out statistics from the final hidden states of every branch."""
    stats: dict[tuple[str, Unit], RunningStats] = {}
    step = streamed.config.head_rows
    device = streamed.ckpt.device
    full = states[frozenset()]
    with streamed.output_stage(), counter(len(batches) * len(units), "leave-one-out head", disable=not show_progress) as bar:
        for b, (ids, mask) in enumerate(batches):
            ids, mask = ids.to(device), mask.to(device)
            h_full = store.get((full, b))  # (B, T, D)
            for r in range(0, ids.shape[0], step):
                rows = slice(r, r + step)
                ref, nll_full = loo_reference(ids[rows], mask[rows], streamed.head(h_full[rows], mask[rows]))
                for unit in units:
                    hidden = store.get((states[branch_of([unit])], b))[rows]
                    add_loo_stats(ref, nll_full, streamed.head(hidden, mask[rows]), unit, metrics, stats)
                del ref, nll_full
            bar.update(len(units))
    return stats


def perplexity_streamed(
    streamed: StreamedModel,
    tokenizer: Any,
    source: str,
    config: PerplexityConfig | None = None,
    masked: Sequence[Unit] = (),
) -> dict[str, Any]:
    """:func:`depthprune.evaluate.perplexity.perplexity` of a streamed model (``masked`` units off)."""
    config = config or PerplexityConfig()
    branch = branch_of(list(masked))

    def score_batches(batches: list[WindowBatch]) -> float:
        inputs = [(wb.ids, wb.mask) for wb in batches]
        step = streamed.config.head_rows
        device = streamed.ckpt.device
        total = 0.0
        with streamed.store(_batch_bytes(streamed, inputs)) as store:
            state = streamed.run(inputs, [branch], store, show_progress=config.show_progress)[branch]
            with streamed.output_stage():
                for b, wb in enumerate(batches):
                    hidden = store.take((state, b))  # (B, T, D)
                    for r in range(0, len(wb.n_scored), step):
                        rows = slice(r, r + step)
                        logits = streamed.head(hidden[rows], wb.mask[rows].to(device), wb.positions[rows].to(device))
                        total += wb.nll(logits, range(len(wb.n_scored))[rows])
        return total

    result = perplexity(streamed.model, tokenizer, source, config, score_batches=score_batches)
    result["protocol"]["execution"] = "layer-streamed"
    return result
