"""Per-token losses from logits that arrive in vocabulary chunks.

The streamed LM-head stage reads the head's weight a block of vocabulary rows at a time,
so neither the whole head nor a sequence's whole ``(T, V)`` logits are ever in memory.
The quantities the in-memory path takes from ``log_softmax`` over the whole vocabulary
are folded together chunk by chunk instead, in float64:

- the log-sum-exp of each token's logits, as a running maximum ``m`` and a running sum
  ``s = sum exp(x - m)`` (rescaled by ``exp(m_old - m_new)`` when the maximum grows);
- the target token's logit, picked from the chunk that holds it;
- for the KL divergence of a masked model from the full one,
  ``KL = sum_v p(v) (x(v) - y(v)) - lse(x) + lse(y)`` (``x`` full, ``y`` masked logits;
  it follows from ``log p = x - lse(x)`` and ``sum_v p(v) = 1``), whose first term is
  ``a / s`` with ``a = sum exp(x - m) (x - y)`` kept beside ``s`` and rescaled with it.

So one pass over the chunks gives NLL and KL alike. The chunk logits are cast to float32
first (as the in-memory path's ``logits.float()``) and then to float64; the sums are
float64, so a chunked value differs from the in-memory float32 ``log_softmax`` only by
the latter's rounding.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class ChunkedLogSumExp:
    """Running log-sum-exp over vocabulary chunks, and each token's target logit.

    Args:
        targets: Target token ids, of any shape ``S``.
    """

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets
        self.max = torch.full(targets.shape, float("-inf"), dtype=torch.float64, device=targets.device)
        self.sum = torch.zeros(targets.shape, dtype=torch.float64, device=targets.device)
        self.target = torch.zeros(targets.shape, dtype=torch.float64, device=targets.device)
        self.rows = 0  # vocabulary rows folded in so far

    def add(self, start: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in the logits of vocabulary rows ``[start, start + C)``.

        Args:
            start: The first vocabulary row of the chunk.
            logits: ``S + (C,)``, float64.

        Returns:
            ``alpha`` (shape ``S``): the factor that rescales sums taken relative to the
            old maximum to the new one; ``e`` (``S + (C,)``): ``exp(logits - new max)``.
        """
        new = torch.maximum(self.max, logits.amax(-1))
        ref = torch.where(torch.isfinite(new), new, torch.zeros_like(new))  # all -inf so far: nothing to scale
        alpha = torch.exp(self.max - ref)
        e = torch.exp(logits - ref.unsqueeze(-1))
        self.sum = self.sum * alpha + e.sum(-1)
        self.max = new
        width = logits.shape[-1]
        inside = (self.targets >= start) & (self.targets < start + width)
        if bool(inside.any()):
            idx = (self.targets - start).clamp(0, width - 1).unsqueeze(-1)
            self.target = torch.where(inside, logits.gather(-1, idx).squeeze(-1), self.target)
        self.rows += logits.shape[-1]
        return alpha, e

    @property
    def lse(self) -> torch.Tensor:
        """``log sum_v exp(x(v))`` over the rows folded in so far (float64)."""
        ref = torch.where(torch.isfinite(self.max), self.max, torch.zeros_like(self.max))
        return ref + torch.log(self.sum)

    @property
    def nll(self) -> torch.Tensor:
        """Per-token negative log-likelihood of the targets, ``lse - x(target)`` (float64)."""
        return self.lse - self.target


class ChunkedKL:
    """``KL(p_full || p_masked)`` per token, folded over the same chunks as the two log-sum-exps."""

    def __init__(self, shape: torch.Size, device: torch.device | None = None) -> None:
        self.a = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, alpha: torch.Tensor, e: torch.Tensor, full: torch.Tensor, masked: torch.Tensor) -> None:
        """Fold in one chunk: ``alpha``, ``e`` from the full model's :meth:`ChunkedLogSumExp.add`."""
        self.a = self.a * alpha + (e * (full - masked)).sum(-1)

    def value(self, full: ChunkedLogSumExp, masked: ChunkedLogSumExp) -> torch.Tensor:
        """The per-token KL divergence once every chunk is in (float64)."""
        return self.a / full.sum - full.lse + masked.lse


def chunked_nll(chunks: Iterable[tuple[int, torch.Tensor]], targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL from ``(start, logits chunk)`` pairs covering the vocabulary (float64)."""
    acc = ChunkedLogSumExp(targets)
    for start, logits in chunks:
        acc.add(start, logits.float().double())
    return acc.nll
