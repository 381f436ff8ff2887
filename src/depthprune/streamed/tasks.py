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
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from depthprune.data import TokenBatches
from depthprune.distributed import all_reduce_sum
from depthprune.errors import InputError
from depthprune.evaluate import TaskSpec
from depthprune.evaluate.perplexity import PerplexityConfig, WindowBatch, perplexity
from depthprune.identity import config_sha256
from depthprune.progress import counter
from depthprune.score import ScoreConfig, ScoreResult, _definition
from depthprune.score.registry import (
    AdaptiveRequest,
    MetricTables,
    parse_metrics,
    stats_table,
)
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
        InputError: an adaptive metric other than leave-one-out and ``shapley``,
            ``shapley`` of a value other than ``loss`` and ``kl``, or ``angular_span``
            over more than one block.
    """
    for m in parse_metrics(list(config.metrics)):
        if m.kind == "adaptive" and m.name not in (*LOO_METRICS, "shapley"):
            raise InputError(
                f"metric {m.name!r} is not supported with --stream; streamed scoring computes the static metrics, "
                f"{', '.join(LOO_METRICS)} and shapley (run {m.name} without --stream)"
            )
    if "shapley" in config.metrics:
        from depthprune.streamed.games import check_stream_value

        check_stream_value(config.value.name)
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
    runs at the end, ``head_rows`` sequences at a time. ``shapley`` (values ``loss`` and
    ``kl``) then takes one more pass per round of coalitions
    (:class:`~depthprune.streamed.games.StreamedGame`).

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
    shapley = [m for m in metrics if m.name == "shapley"]
    collector = StaticCollector(layout, units, static, config.last_token_only, config.span) if static else None
    on_trunk = (lambda i, b, batch: _hooked(collector, i, batch)) if collector is not None else None
    branches = [frozenset(), *(branch_of([u]) for u in units)] if loo else []
    scores: dict[str, dict[str, float | None]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    cost: dict[str, int] = {}
    spilled = 0
    with streamed.store(_batch_bytes(streamed, batches)) as store:
        # Shapley alone needs no pass of its own: its rounds are passes (below).
        states = streamed.run(batches, branches, store, on_trunk, show_progress=config.show_progress) if branches or on_trunk else {}
        if collector is not None:
            for m in static:
                scores[m.name], stderr[m.name] = stats_table(collector.stats, m.name)
        if loo:
            stats = _loo_head(streamed, batches, units, states, store, loo, config.show_progress)
            tables = MetricTables.from_stats(stats, loo, {})
            scores.update(tables.scores)
            stderr.update(tables.stderr)
        spilled = store.spilled_bytes
    definitions = {m.name: {**_definition(m, config), "execution": "layer-streamed"} for m in metrics}
    if shapley:
        # One streamed pass per round of coalitions (see depthprune.streamed.games).
        from depthprune.score.shapley.metric import compute_shapley
        from depthprune.streamed.games import StreamedGame

        def game_of(value: Any, players: list[Unit]) -> StreamedGame:
            return StreamedGame(streamed, value, players, batch_size=config.shapley.batch_size)

        tables = compute_shapley(AdaptiveRequest(layout, data, units, config), shapley, game_of)
        scores.update(tables.scores)
        stderr.update(tables.stderr)
        cost.update(tables.cost)
        definitions.update({k: {**v, "execution": "layer-streamed"} for k, v in tables.definitions.items()})
    cost["stream_layer_reads"] = streamed.layer_reads
    cost["stream_spilled_bytes"] = spilled
    return ScoreResult(
        model=model_name,
        family=layout.spec.family,
        n_layers=layout.n_layers,
        calibration=data.info,
        scores={m.name: scores[m.name] for m in metrics},
        stderr={m.name: stderr[m.name] for m in metrics},
        definitions=definitions,
        seed=config.seed,
        cost=cost,
        config_sha256=config_sha256(streamed.model.config),
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


def next_token_valid(mask: torch.Tensor) -> torch.Tensor:
    """Positions ``(B, T-1)`` whose next token is scored, as ``NextTokenTargets.of`` (float64)."""
    return (mask[:, 1:].bool() & mask[:, :-1].bool()).double()


@torch.no_grad()
def branch_token_losses(
    streamed: StreamedModel,
    batches: Sequence[Batch],
    states: dict[frozenset[Unit], int],
    store: Any,
    reference: frozenset[Unit] | None = None,
    show_progress: bool = False,
    desc: str = "streamed head",
) -> dict[frozenset[Unit], list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Each branch's per-token next-token NLL, and KL from a reference branch, from the chunked head.

    The LM head is read once, a chunk of vocabulary rows at a time; every sequence of every
    branch passes each chunk, ``head_rows`` sequences per call, and the per-token
    log-sum-exps, target logits and KL terms are folded over the chunks
    (:mod:`depthprune.streamed.head`).

    Args:
        streamed: The model, after :meth:`StreamedModel.run` filled ``store``.
        batches: The batches of that run.
        states: Branch -> its state id in ``store`` (what ``run`` returned).
        store: The activation store.
        reference: With a branch of ``states``: also ``KL(p_reference || p_branch)`` per token.
        show_progress: Show a progress bar on a terminal.
        desc: The progress bar's label.

    Returns:
        Branch -> per batch ``(nll, kl)``, each ``(B, T-1)`` float64 (``kl`` ``None``
        without a reference); positions that are not scored hold garbage, weigh them with
        :func:`next_token_valid`.
    """
    step = streamed.config.head_rows
    device = streamed.ckpt.device
    groups = [(b, slice(r, r + step)) for b, (ids, _) in enumerate(batches) for r in range(0, ids.shape[0], step)]
    others = [br for br in states if br != reference]
    acc: list[tuple[ChunkedLogSumExp | None, dict[frozenset[Unit], tuple[ChunkedLogSumExp, ChunkedKL | None]]]] = []
    for b, rows in groups:
        targets = batches[b][0][rows, 1:].to(device)  # (R, T-1)
        ref = ChunkedLogSumExp(targets) if reference is not None else None
        acc.append((ref, {br: (ChunkedLogSumExp(targets), ChunkedKL(targets.shape, device) if ref is not None else None) for br in others}))
    total = streamed.n_head_chunks() * len(groups)
    with streamed.output_stage(), counter(total, desc, disable=not show_progress) as bar:
        for start, chunk in streamed.head_chunks():
            for (b, rows), (ref, per_branch) in zip(groups, acc, strict=True):
                mask = batches[b][1][rows].to(device)
                if ref is not None:
                    x_ref = _logits64(streamed, store.get((states[reference], b))[rows], mask, chunk)[:, :-1]  # (R, T-1, C)
                    alpha, e = ref.add(start, x_ref)
                for br, (lse, kl) in per_branch.items():
                    x = _logits64(streamed, store.get((states[br], b))[rows], mask, chunk)[:, :-1]
                    lse.add(start, x)
                    if kl is not None:
                        kl.add(alpha, e, x_ref, x)
                    del x
                if ref is not None:
                    del x_ref, alpha, e
                bar.update()
            del chunk
    out: dict[frozenset[Unit], list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
    for br in states:
        per_batch: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for b in range(len(batches)):
            parts = [(ref, per_branch) for (bb, _), (ref, per_branch) in zip(groups, acc, strict=True) if bb == b]
            if br == reference:
                nll = torch.cat([ref.nll for ref, _ in parts])  # type: ignore[union-attr]
                kl = torch.zeros_like(nll)
            else:
                nll = torch.cat([pb[br][0].nll for _, pb in parts])
                kl = torch.cat([pb[br][1].value(ref, pb[br][0]) for ref, pb in parts]) if reference is not None else None  # type: ignore[union-attr,arg-type]
            per_batch.append((nll, kl))
        out[br] = per_batch
    return out


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

    The values are those of :func:`~depthprune.score.adaptive.add_loo_stats`: per
    sequence, the mean over its valid next-token positions of the change of NLL, and of
    ``KL(p_full || p_masked)`` (from :func:`branch_token_losses`).
    """
    device = streamed.ckpt.device
    full = frozenset()
    reference = full if "loo_kl" in metrics else None
    losses = branch_token_losses(streamed, batches, states, store, reference, show_progress, "leave-one-out head")
    stats: dict[tuple[str, Unit], RunningStats] = {}
    for b, (_, mask) in enumerate(batches):
        valid = next_token_valid(mask.to(device))  # (B, T-1)
        n_valid = valid.sum(-1).clamp_min(1)
        nll_full = _finite(losses[full][b][0], "the full model's loss")
        for unit in units:
            nll, kl = losses[branch_of([unit])][b]
            if "loo_loss" in metrics:
                delta = _finite(((nll - nll_full) * valid).sum(-1) / n_valid, f"the loss with {unit} masked")
                stats.setdefault(("loo_loss", unit), RunningStats()).add(delta)
            if kl is not None and "loo_kl" in metrics:
                value = _finite((kl * valid).sum(-1) / n_valid, f"the KL divergence with {unit} masked")
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
    return perplexity_streamed_many(streamed, tokenizer, source, config, [masked])[0]


def perplexity_streamed_many(
    streamed: StreamedModel,
    tokenizer: Any,
    source: str,
    config: PerplexityConfig | None = None,
    masks: Sequence[Sequence[Unit]] = ((),),
) -> list[dict[str, Any]]:
    """The perplexity with each of ``masks`` masked, all in one streamed pass.

    Each mask is a branch (see :meth:`StreamedModel.run`), so every layer is read once
    whatever the number of masks; the LM head is read once, in vocabulary chunks.

    Returns:
        One :func:`~depthprune.evaluate.perplexity.perplexity` result per mask, in order.
    """
    config = config or PerplexityConfig()
    branches = [branch_of(list(m)) for m in masks]
    totals: dict[frozenset[Unit], float] = {}

    def score_batches(batches: list[WindowBatch]) -> float:
        if not batches:  # a torchrun rank with no window of its own
            totals.update(dict.fromkeys(branches, 0.0))
            return 0.0
        inputs = [(wb.ids, wb.mask) for wb in batches]
        step = streamed.config.head_rows
        device = streamed.ckpt.device
        with streamed.store(_batch_bytes(streamed, inputs)) as store:
            states = streamed.run(inputs, branches, store, show_progress=config.show_progress)
            # The head is read once, a chunk of vocabulary rows at a time; every window of every
            # branch passes each chunk (see _loo_head). Per token: lse - x(target), as cross_entropy.
            groups = [(b, slice(r, r + step)) for b, wb in enumerate(batches) for r in range(0, len(wb.n_scored), step)]
            acc = {br: [ChunkedLogSumExp(batches[b].targets[rows].to(device)) for b, rows in groups] for br in states}
            with streamed.output_stage():
                for start, chunk in streamed.head_chunks():
                    for g, (b, rows) in enumerate(groups):
                        wb = batches[b]
                        mask, keep = wb.mask[rows].to(device), wb.positions[rows].to(device)
                        for br, sid in states.items():
                            hidden = store.get((sid, b))[rows]  # (R, T, D)
                            acc[br][g].add(start, _logits64(streamed, hidden, mask, chunk, keep))
                    del chunk
            for br in states:
                total = 0.0
                for (b, rows), lse in zip(groups, acc[br], strict=True):
                    nll = lse.nll  # (R, K) float64
                    for j, i in enumerate(range(len(batches[b].n_scored))[rows]):
                        total += float(nll[j, : batches[b].n_scored[i]].sum())
                totals[br] = total
        return totals[branches[0]]

    first = perplexity(streamed.model, tokenizer, source, config, score_batches=score_batches)
    first["protocol"]["execution"] = "layer-streamed"
    # Under torchrun each rank scored its share of the windows: sum every branch over ranks
    # (perplexity() did so for the first one only).
    summed = all_reduce_sum([totals.get(br, 0.0) for br in branches])
    results = []
    for br, total in zip(branches, summed, strict=True):
        nll = float(total) / first["n_scored"]
        results.append({**first, "nll": nll, "perplexity": math.exp(nll), "protocol": dict(first["protocol"])})
    return results


def evaluate_points_streamed(
    streamed: StreamedModel,
    tokenizer: Any,
    specs: Sequence[TaskSpec],
    points: Sequence[Sequence[Unit]],
) -> list[dict[str, dict[str, Any]]]:
    """Evaluate perplexity tasks with each of ``points`` masked: one streamed pass per task.

    Every point is a branch of the pass (:func:`perplexity_streamed_many`), so each layer
    is read once per task, whatever the number of points (sweep points).

    Args:
        streamed: The model.
        tokenizer: Its tokenizer.
        specs: ``ppl:`` task specs.
        points: The units masked at each point.

    Returns:
        Per point, ``{spec: result}`` as :func:`depthprune.evaluate.evaluate` keys them.

    Raises:
        InputError: a task other than perplexity.
    """
    check_stream_tasks(specs)
    out: list[dict[str, dict[str, Any]]] = [{} for _ in points]
    for spec in specs:
        for point, result in zip(out, perplexity_streamed_many(streamed, tokenizer, spec.target, spec.config, points), strict=True):
            key = spec.text if spec.text not in point else f"{spec.text}#{len(point)}"
            point[key] = {**result, "spec": spec.text}
    return out


def check_stream_tasks(specs: Sequence[TaskSpec]) -> None:
    """Refuse, in one line, the tasks that streamed evaluation does not compute (all but ``ppl``).

    Raises:
        InputError: a task other than perplexity.
    """
    other = [s.text for s in specs if s.kind != "ppl"]
    if other:
        raise InputError(f"--stream evaluates perplexity (ppl:) tasks only; run {other[0]!r} without --stream")
