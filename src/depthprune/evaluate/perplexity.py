"""Perplexity of a causal LM on text, with the protocol recorded in the result.

The protocol is the one of the Hugging Face guide "Perplexity of fixed-length models",
which is also the usual WikiText-2 protocol:

1. The text is tokenized once into one token stream (the raw file as it is; several
   documents are joined with EOS, or kept apart with ``documents="separate"``).
2. Windows of ``seq_len`` (T) tokens start every ``stride`` (S) tokens. With S = T the
   windows do not overlap (``mode="windows"``); with S < T they slide
   (``mode="sliding"``), and each window scores only the tokens that the previous
   window did not, so every token gets at least T - S tokens of context.
3. Every scored token is scored exactly once, and perplexity is
   ``exp(sum of NLL / number of scored tokens)``.

BOS handling (``bos``): ``stream`` puts BOS once at the start of each stream (what a
tokenizer that adds BOS does to the whole text, as in the guide); ``window`` starts
every window with BOS, so a window holds T - 1 text tokens and the first text token
of each window is scored too; ``none`` adds nothing; ``auto`` is ``stream`` when the
tokenizer adds BOS by itself, else ``none``. The first token of a stream without a
window BOS has no context and is never scored; with non-overlapping windows neither is
the first token of each window.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from depthprune.data import (
    DEFAULT_SEQ_LEN,
    context_length,
    read_texts,
    tokenizer_adds_bos,
)
from depthprune.devices import HOST
from depthprune.distributed import all_reduce_sum, strided
from depthprune.errors import InputError, check_choice
from depthprune.evaluate._model import logits_at, model_device, pad_id_of, right_pad
from depthprune.progress import counter

logger = logging.getLogger(__name__)

__all__ = ["PerplexityConfig", "Window", "WindowBatch", "leading_slice", "perplexity", "plan_windows", "token_streams"]

Bos = Literal["auto", "none", "stream", "window"]
Documents = Literal["join", "separate"]
BOS_MODES: tuple[str, ...] = ("auto", "none", "stream", "window")
DOCUMENT_MODES: tuple[str, ...] = ("join", "separate")
REFERENCE = "Hugging Face Transformers guide 'Perplexity of fixed-length models' (windows with stride)"


@dataclass(frozen=True)
class PerplexityConfig:
    """How perplexity is measured.

    Attributes:
        seq_len: Tokens per window (T), BOS included; default: the model's context, at
            most 2048.
        stride: Tokens between window starts (S); default: T (T - 1 with a window BOS),
            i.e. non-overlapping windows.
        bos: ``auto``, ``none``, ``stream`` or ``window`` (see the module docstring).
        documents: ``join`` the documents of the source with EOS into one stream, or
            keep them ``separate`` (windows never cross a document boundary).
        max_tokens: Use only the first this many tokens of the stream(s), for quick runs:
            a fixed leading slice (a stream BOS counts; with ``documents="separate"``
            the first streams whole, then the start of the next). The protocol records
            it, with ``n_tokens_available`` and the slice's SHA-256.
        strip: Strip the whitespace around each document (e.g. the newlines next to the
            ``<|endoftext|>`` markers of a file of stories). Off: the text is used as it is.
        batch_size: Windows per forward pass.
        text_field: Field holding the text in JSONL records and datasets.
        show_progress: Show a progress bar on a terminal.
    """

    seq_len: int | None = None
    stride: int | None = None
    bos: Bos = "auto"
    documents: Documents = "join"
    max_tokens: int | None = None
    strip: bool = False
    batch_size: int = 4
    text_field: str = "text"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.seq_len is not None and self.seq_len < 2:
            raise InputError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.stride is not None and self.stride < 1:
            raise InputError(f"stride must be at least 1, got {self.stride}")
        check_choice(self.bos, BOS_MODES, "bos mode")
        check_choice(self.documents, DOCUMENT_MODES, "documents mode")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise InputError(f"max_tokens must be at least 2, got {self.max_tokens}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Window:
    """One window over a token stream, in stream positions.

    Attributes:
        stream: Which stream (document) the window reads.
        start: First stream token in the window.
        end: One past the last stream token in the window.
        score_from: First stream position whose token is scored; ``score_from..end-1``.
    """

    stream: int
    start: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def plan_windows(n_tokens: int, seq_len: int, stride: int | None = None, window_bos: bool = False, stream: int = 0) -> list[Window]:
    """The windows over a stream of ``n_tokens`` tokens, following the HF guide.

    Args:
        n_tokens: Length of the stream (a stream BOS counts as a token).
        seq_len: Tokens per model input (T), including a window BOS.
        stride: Stream tokens between window starts; default: the window's text span.
        window_bos: Whether each window is fed with a BOS in front (so it holds T - 1
            stream tokens, and its first stream token can be scored).
        stream: Index recorded in each window.

    Returns:
        The windows, in order; every position ``>= 1`` (``>= 0`` with a window BOS) is
        scored by exactly one window when ``stride`` is below the span, and every
        position but window starts when the windows do not overlap.

    Raises:
        InputError: ``stride`` is larger than the window's text span.
    """
    span = seq_len - 1 if window_bos else seq_len
    if span < 1:
        raise InputError(f"seq_len {seq_len} leaves no room for text after BOS; use seq_len >= 2")
    stride = span if stride is None else stride
    if not 1 <= stride <= span:
        raise InputError(
            f"stride {stride} is outside 1..{span} (the text tokens per window of seq_len {seq_len}); "
            "give a smaller stride or a larger seq_len"
        )
    windows: list[Window] = []
    prev_end = 0
    for start in range(0, n_tokens, stride):
        end = min(start + span, n_tokens)
        # A token needs a token before it in the same input to be predicted, unless a
        # BOS precedes the window.
        first = prev_end if window_bos else max(prev_end, start + 1)
        if end > first:
            windows.append(Window(stream, start, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _resolve_bos(bos: str, tokenizer: Any) -> str:
    if bos == "auto":
        return "stream" if tokenizer_adds_bos(tokenizer) else "none"
    if bos != "none" and getattr(tokenizer, "bos_token_id", None) is None:
        raise InputError(f"bos={bos} was asked for, but the tokenizer has no BOS token; use bos=none")
    return bos


def token_streams(texts: list[str], tokenizer: Any, config: PerplexityConfig, bos: str) -> list[list[int]]:
    """Tokenize documents (no special tokens) into the stream(s) that windows are cut from.

    Args:
        texts: Documents, e.g. from :func:`depthprune.data.read_texts`.
        tokenizer: A Hugging Face tokenizer.
        config: ``documents`` and ``max_tokens`` are used.
        bos: Resolved BOS mode; ``stream`` puts BOS in front of each stream.
    """
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    if config.documents == "separate":
        streams = [list(ids) for ids in encoded]
    else:
        eos = getattr(tokenizer, "eos_token_id", None)
        joined: list[int] = []
        for i, ids in enumerate(encoded):
            if i and eos is not None:
                joined.append(eos)
            joined.extend(ids)
        streams = [joined]
    if bos == "stream":
        streams = [[tokenizer.bos_token_id, *s] for s in streams]
    return leading_slice([s for s in streams if s], config.max_tokens)


def leading_slice(streams: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """The first ``max_tokens`` tokens of the streams, in order (all of them for ``None``)."""
    if max_tokens is None:
        return streams
    capped, left = [], max_tokens
    for s in streams:
        if left <= 0:
            break
        capped.append(s[:left])
        left -= len(capped[-1])
    return capped


def _sha256(streams: list[list[int]]) -> str:
    h = hashlib.sha256()
    for s in streams:
        h.update(np.asarray(s, dtype="<i8").tobytes())
        h.update(b"\xff" * 8)
    return h.hexdigest()


@dataclass(frozen=True)
class WindowBatch:
    """A batch of windows as model inputs, and which logits score which tokens.

    Attributes:
        ids: ``(B, T)`` token ids, right-padded.
        mask: ``(B, T)``, 1 for real tokens.
        positions: ``(B, K)`` rows of the logits that predict the scored tokens.
        targets: ``(B, K)`` the scored tokens.
        n_scored: Scored tokens of each window (the first ``n`` of its ``K`` positions).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    n_scored: tuple[int, ...]

    @classmethod
    def of(cls, streams: list[list[int]], windows: list[Window], bos_id: int | None, pad_id: int) -> WindowBatch:
        offset = 1 if bos_id is not None else 0
        rows = [([bos_id] if bos_id is not None else []) + streams[w.stream][w.start : w.end] for w in windows]
        ids, mask = right_pad(rows, pad_id)  # (B, T)
        k = max(w.n_scored for w in windows)
        # Row index of the logit that predicts the token at stream position p is p - start + offset - 1.
        first = torch.tensor([w.score_from - w.start + offset - 1 for w in windows], device=HOST)  # (B,)
        steps = torch.arange(k, device=HOST)[None, :]  # (1, K)
        positions = first[:, None] + steps  # (B, K)
        valid = steps < torch.tensor([w.n_scored for w in windows], device=HOST)[:, None]  # (B, K)
        positions = torch.where(valid, positions, first[:, None])
        targets = torch.take_along_dim(ids, positions + 1, dim=1)  # (B, K)
        return cls(ids, mask, positions, targets, tuple(w.n_scored for w in windows))

    def nll(self, logits: torch.Tensor, rows: range | None = None) -> float:
        """Summed NLL (float64) of the scored tokens of ``rows`` from their logits ``(len(rows), K, V)``."""
        rows = rows if rows is not None else range(len(self.n_scored))
        total = 0.0
        for j, i in enumerate(rows):  # row by row: one float32 copy of (K, V) at a time
            n = self.n_scored[i]
            nll = F.cross_entropy(logits[j, :n].float(), self.targets[i, :n].to(logits.device), reduction="none")  # (n,)
            total += float(nll.double().sum())
        return total


@torch.no_grad()
def _window_nll(model: nn.Module, batch: WindowBatch) -> float:
    """Summed NLL (float64) of the scored tokens of a batch of windows."""
    device = model_device(model)
    logits = logits_at(model, batch.ids.to(device), batch.mask.to(device), batch.positions.to(device))  # (B, K, V)
    return batch.nll(logits)


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    source: str | os.PathLike[str],
    config: PerplexityConfig | None = None,
    *,
    score_batches: Callable[[list[WindowBatch]], float] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on a text source, with the protocol used.

    Args:
        model: A causal LM (masked units stay masked; nothing is changed).
        tokenizer: Its tokenizer.
        source: A ``.txt``/``.jsonl`` file, a folder of them, or a Hugging Face dataset
            (see :func:`depthprune.data.read_texts`). A ``.txt`` file is read as it is,
            split only at ``<|endoftext|>`` markers.
        config: The protocol; defaults to non-overlapping windows of the model's context
            (at most 2048 tokens).
        score_batches: Computes the summed NLL of all batches at once instead of running
            ``model`` batch by batch (layer-streamed execution passes every batch through
            a layer while it is loaded); ``model`` then only needs a config.

    Returns:
        ``{"task": "ppl", "source", "perplexity", "nll", "n_scored", "higher_is_better",
        "protocol": {...}}`` where ``perplexity == exp(nll)`` and ``nll`` is the mean
        negative log-likelihood (nats) of the scored tokens.

    Raises:
        InputError: bad source, a window larger than the model's context, no tokens to score.
    """
    config = config or PerplexityConfig()
    if tokenizer is None:
        raise InputError("the model has no tokenizer; perplexity needs one to tokenize the text")
    context = context_length(model)
    seq_len = config.seq_len or min(context or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    if context is not None and seq_len > context:
        raise InputError(f"seq_len {seq_len} exceeds the model's context of {context} tokens; pass seq_len<={context}")
    bos = _resolve_bos(config.bos, tokenizer)
    window_bos = bos == "window"
    texts = read_texts(source, config.text_field)
    if config.strip:
        texts = [t.strip() for t in texts]
    available = token_streams(texts, tokenizer, replace(config, max_tokens=None), bos)
    streams = leading_slice(available, config.max_tokens)
    windows = [w for i, s in enumerate(streams) for w in plan_windows(len(s), seq_len, config.stride, window_bos, i)]
    if not windows:
        raise InputError(f"source {str(source)!r} holds too few tokens to score (need at least 2)")
    stride = config.stride or (seq_len - 1 if window_bos else seq_len)
    bos_id = tokenizer.bos_token_id if window_bos else None
    pad_id = pad_id_of(tokenizer)
    # Longest windows first: batches pad less, and memory errors show up at once.
    order = sorted(range(len(windows)), key=lambda i: windows[i].end - windows[i].start, reverse=True)
    batches = [
        WindowBatch.of(streams, [windows[i] for i in order[b : b + config.batch_size]], bos_id, pad_id)
        for b in range(0, len(order), config.batch_size)
    ]
    n = sum(sum(b.n_scored) for b in batches)
    mine = [batches[k] for k in strided(len(batches))]  # under torchrun, every size-th batch
    if score_batches is not None:
        total = score_batches(mine)
    else:
        total = 0.0
        with counter(sum(len(b.n_scored) for b in mine), "perplexity", disable=not config.show_progress) as bar:
            for batch in mine:
                total += _window_nll(model, batch)
                bar.update(len(batch.n_scored))
    (total_all,) = all_reduce_sum([total])  # NLL sums over ranks, never means; n counts every window
    total = float(total_all)
    nll = total / n
    protocol = {
        "mode": "windows" if stride == (seq_len - 1 if window_bos else seq_len) else "sliding",
        "seq_len": seq_len,
        "stride": stride,
        "bos": bos,
        "documents": config.documents,
        "n_documents": len(texts),
        "n_streams": len(streams),
        "n_tokens": sum(len(s) for s in streams),
        "n_windows": len(windows),
        "n_scored": n,
        "max_tokens": config.max_tokens,
        "n_tokens_available": sum(len(s) for s in available),
        "tokens_sha256": _sha256(streams),
        "reference": REFERENCE,
        "config": asdict(config),
    }
    logger.info("perplexity %.4f over %d tokens of %s", math.exp(nll), n, source)
    return {
        "task": "ppl",
        "source": str(source),
        "perplexity": math.exp(nll),
        "nll": nll,
        "n_scored": n,
        "higher_is_better": False,
        "protocol": protocol,
    }
