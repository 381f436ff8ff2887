"""The stages that run layer-streamed: static metrics, leave-one-out and perplexity.

Each gives the same numbers as its in-memory counterpart: the static metrics reuse the
same statistics code (:class:`~depthprune.score.static.StaticCollector`), and only the
order of work changes: all batches pass a layer before the next one is read. Losses are
computed from the LM head in vocabulary chunks (:mod:`depthprune.streamed.head`), with the
definitions of :func:`~depthprune.score.adaptive.add_loo_stats` and
:meth:`~depthprune.evaluate.perplexity.WindowBatch.nll` but float64 sums instead of a
float32 ``log_softmax``.
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
from depthprune.score.registry import MetricTables, parse_metrics, stats_table
from depthprune.score.static import NonFiniteError, RunningStats, StaticCollector
from depthprune.streamed.head import ChunkedKL, ChunkedLogSumExp
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


def _logits64(streamed: StreamedModel, hidden: torch.Tensor, mask: torch.Tensor, chunk: Any, keep: torch.Tensor | int = 0) -> torch.Tensor:
    """One chunk's logits as the in-memory path sees them (cast to float32), then float64."""
    return streamed.head(hidden, mask, keep, chunk).float().double()


def _finite(values: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(
            f"non-finite values in {what}: the model's weights or dtype are broken; check the checkpoint, or try --dtype float32"
        )
    return values


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
    """The leave-one-out statistics from the final hidden states of every branch.

    The LM head is read once, a chunk of vocabulary rows at a time; every sequence of every
    branch passes each chunk, and the per-token log-sum-exps, target logits and KL terms
    are folded over the chunks (:mod:`depthprune.streamed.head`). The values are those of
    :func:`~depthprune.score.adaptive.add_loo_stats`: per sequence, the mean over its valid
    next-token positions of the change of NLL, and of ``KL(p_full || p_masked)``.
    """
    step = streamed.config.head_rows
    device = streamed.ckpt.device
    full = states[frozenset()]
    groups = [(b, slice(r, r + step)) for b, (ids, _) in enumerate(batches) for r in range(0, ids.shape[0], step)]
    want_kl = "loo_kl" in metrics
    acc: list[tuple[ChunkedLogSumExp, dict[Unit, tuple[ChunkedLogSumExp, ChunkedKL | None]]]] = []
    for b, rows in groups:
        targets = batches[b][0][rows, 1:].to(device)  # (R, T-1)
        per_unit = {u: (ChunkedLogSumExp(targets), ChunkedKL(targets.shape, device) if want_kl else None) for u in units}
        acc.append((ChunkedLogSumExp(targets), per_unit))
    total = streamed.n_head_chunks() * len(groups)
    with streamed.output_stage(), counter(total, "leave-one-out head", disable=not show_progress) as bar:
        for start, chunk in streamed.head_chunks():
            for (b, rows), (ref, per_unit) in zip(groups, acc, strict=True):
                mask = batches[b][1][rows].to(device)
                x_full = _logits64(streamed, store.get((full, b))[rows], mask, chunk)[:, :-1]  # (R, T-1, C)
                alpha, e = ref.add(start, x_full)
                for unit in units:
                    x = _logits64(streamed, store.get((states[branch_of([unit])], b))[rows], mask, chunk)[:, :-1]
                    lse, kl = per_unit[unit]
                    lse.add(start, x)
                    if kl is not None:
                        kl.add(alpha, e, x_full, x)
                    del x
                del x_full, alpha, e
                bar.update()
            del chunk
    stats: dict[tuple[str, Unit], RunningStats] = {}
    for (b, rows), (ref, per_unit) in zip(groups, acc, strict=True):
        mask = batches[b][1][rows].to(device)
        valid = (mask[:, 1:].bool() & mask[:, :-1].bool()).double()  # (R, T-1), as NextTokenTargets.of
        n_valid = valid.sum(-1).clamp_min(1)
        nll_full = _finite(ref.nll, "the full model's loss")
        for unit in units:
            lse, kl = per_unit[unit]
            if "loo_loss" in metrics:
                delta = _finite(((lse.nll - nll_full) * valid).sum(-1) / n_valid, f"the loss with {unit} masked")
                stats.setdefault(("loo_loss", unit), RunningStats()).add(delta)
            if kl is not None:
                value = _finite((kl.value(ref, lse) * valid).sum(-1) / n_valid, f"the KL divergence with {unit} masked")
                stats.setdefault(("loo_kl", unit), RunningStats()).add(value)
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
            # The head is read once, a chunk of vocabulary rows at a time; every window passes
            # each chunk (see _loo_head). Per token: lse - x(target), as cross_entropy.
            groups = [(b, slice(r, r + step)) for b, wb in enumerate(batches) for r in range(0, len(wb.n_scored), step)]
            acc = [ChunkedLogSumExp(batches[b].targets[rows].to(device)) for b, rows in groups]
            with streamed.output_stage():
                for start, chunk in streamed.head_chunks():
                    for (b, rows), lse in zip(groups, acc, strict=True):
                        wb = batches[b]
                        hidden = store.get((state, b))[rows]  # (R, T, D)
                        lse.add(start, _logits64(streamed, hidden, wb.mask[rows].to(device), chunk, wb.positions[rows].to(device)))
                    del chunk
            for (b, rows), lse in zip(groups, acc, strict=True):
                nll = lse.nll  # (R, K) float64
                for j, i in enumerate(range(len(batches[b].n_scored))[rows]):
                    total += float(nll[j, : batches[b].n_scored[i]].sum())
        return total

    result = perplexity(streamed.model, tokenizer, source, config, score_batches=score_batches)
    result["protocol"]["execution"] = "layer-streamed"
    return result
