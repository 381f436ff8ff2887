"""Measured generation speed of the original and pruned models, and an honest comparison.

Prefill (the prompt in one forward pass) and decode (one token at a time on the KV cache,
greedy) are timed separately, because pruning attention sublayers speeds them up by
different amounts. The models take turns in every repeat, in an order that flips each
repeat (AB BA ...), so drift in the machine's load weighs on both alike. Each model's
tokens/s is summarised by the median and the interquartile range of the repeats; when the
two ranges overlap, the comparison says "no measurable difference" instead of a ratio
that would be noise (on a shared machine one slow repeat can make either model look
slower).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

NO_DIFFERENCE = "no measurable difference"
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class SpeedConfig:
    """What to time.

    Attributes:
        prompt_tokens: Prompt length, tokens (batch 1).
        new_tokens: Tokens decoded after the prompt, one forward pass each.
        repeats: Timed runs per model, alternating between the models.
    """

    prompt_tokens: int = 64
    new_tokens: int = 32
    repeats: int = 7

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range (``low``..``high``) of some repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements to summarise")
        if len(values) == 1:
            return cls(values[0], values[0], values[0], 1)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, len(values))

    def overlaps(self, other: Spread) -> bool:
        return self.low <= other.high and other.low <= self.high


def compare(before: Spread, after: Spread) -> str:
    """How ``after`` compares with ``before`` (both tokens/s, higher is faster).

    Returns:
        ``"no measurable difference"`` when the interquartile ranges overlap, else
        ``"1.32x faster"`` or ``"0.81x (slower)"``: the ratio of the medians.
    """
    if before.overlaps(after) or before.median <= 0:
        return NO_DIFFERENCE
    ratio = after.median / before.median
    return f"{ratio:.2f}x faster" if ratio > 1 else f"{ratio:.2f}x (slower)"


def speed_rows(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[tuple[str, Spread, Spread]]:
    """Report rows ``(label, original, pruned)`` from two measurements as :func:`measure_speed`
    writes them; none when either is missing (an ``eval.json`` from an older version)."""
    if not before or not after:
        return []
    rows = []
    for phase in PHASES:
        label = (
            f"prefill, tokens/s (batch 1, {before['prompt_tokens']}-token prompt)"
            if phase == "prefill"
            else f"decode, tokens/s (batch 1, {before['new_tokens']} tokens on the KV cache)"
        )
        rows.append((label, Spread.of(before[f"{phase}_tokens_per_second"]), Spread.of(after[f"{phase}_tokens_per_second"])))
    return rows


def _prompt(tokenizer: Any, n: int) -> list[int]:
    """``n`` token ids of plain text (a short story repeated as needed)."""
    text = "Once upon a time, a little girl named Lily found a shiny red ball in the park. "
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return (ids * (n // len(ids) + 1))[:n]


def _time_once(model: Any, prompt: Any, new_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill and of ``new_tokens`` greedy decode steps."""
    import torch
    from transformers import DynamicCache

    def now() -> float:
        if prompt.is_cuda:  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(prompt.device)
        return time.perf_counter()

    cache = DynamicCache(config=model.config)
    start = now()
    out = model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
    prefilled = now()
    token = out.logits[:, -1:].argmax(-1)  # (1, 1)
    for _ in range(new_tokens):
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return prefilled - start, now() - prefilled


def measure_speed(
    models: dict[str, Any],
    tokenizer: Any,
    config: SpeedConfig | None = None,
    *,
    timer: Callable[[Any, Any, int], tuple[float, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Prefill and decode tokens/s of each model, the models alternating in every repeat.

    Args:
        models: Causal LMs by name (e.g. ``original``, ``pruned``), in eval mode.
        tokenizer: Their tokenizer, for the prompt.
        config: Prompt length, tokens to decode, repeats.
        timer: ``timer(model, prompt_ids, new_tokens) -> (prefill_s, decode_s)``; the
            default runs the model (tests inject timings here).

    Returns:
        ``{name: {"prefill_tokens_per_second": [...], "decode_tokens_per_second": [...],
        "prompt_tokens", "new_tokens", "repeats"}}``, one value per repeat.
    """
    import torch

    from depthprune.data import context_length
    from depthprune.devices import input_device

    config = config or SpeedConfig()
    limit = min((context_length(m) or 1 << 30) for m in models.values())
    n_prompt = max(1, min(config.prompt_tokens, limit - config.new_tokens))
    prompt = torch.tensor([_prompt(tokenizer, n_prompt)])  # (1, P)
    if timer is None:
        timer = lambda model, ids, new: _time_once(model, ids.to(input_device(model)), new)  # noqa: E731

    names = list(models)
    out: dict[str, dict[str, Any]] = {
        n: {
            "prefill_tokens_per_second": [],
            "decode_tokens_per_second": [],
            "prompt_tokens": n_prompt,
            "new_tokens": config.new_tokens,
            "repeats": config.repeats,
        }
        for n in names
    }
    with torch.no_grad():
        for name in names:  # warm-up, untimed: first-call allocations and kernel selection
            timer(models[name], prompt, config.new_tokens)
        for r in range(config.repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                prefill_s, decode_s = timer(models[name], prompt, config.new_tokens)
                out[name]["prefill_tokens_per_second"].append(n_prompt / prefill_s)
                out[name]["decode_tokens_per_second"].append(config.new_tokens / decode_s)
    return out
