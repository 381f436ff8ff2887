"""HellaSwag, 0-shot, exactly as lm-evaluation-harness's ``hellaswag`` task scores it.

For each item (lm-eval's ``hellaswag/utils.py`` and ``api/task.py``):

- query = ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``
- choices = ``preprocess(ending)`` for the 4 endings
- an ending's score is the summed log-probability of the tokens of ``" " + choice``
  given the query. Tokens are split as lm-eval's ``HFLM`` splits them: the query is
  tokenized alone (as the tokenizer does by default, with BOS when it adds one), the
  query plus continuation is tokenized whole, and the continuation's tokens are the
  whole's tokens after the query's length. An input longer than the model's context
  keeps its last tokens.
- ``acc``: the ending with the highest score is the gold one; ``acc_norm``: the same
  with each score divided by the length of the choice in characters (``len(choice)``,
  lm-eval's ``completion_len``). Ties go to the first ending, as ``np.argmax`` does.

``preprocess`` strips the text, turns ``" [title]"`` into ``". "``, removes every
``[...]`` tag (WikiHow artifacts) and turns double spaces into single ones.

Data: the 6-line text format (``hellaswag_val_full.txt``, optionally ``.bz2``: the
context line ``activity_label: ctx``, the gold index 0-3, then the 4 endings), or JSON
Lines with the fields of the Hugging Face ``Rowan/hellaswag`` rows (``activity_label``,
``ctx_a``, ``ctx_b``, ``endings``, ``label``). The text format does not say where
``ctx_a`` ends and ``ctx_b`` starts, which matters because lm-eval capitalizes
``ctx_b``: :func:`split_context` takes ``ctx_b`` to be the unfinished sentence at the
end of the context (ActivityNet items end with the lower-case start of a sentence, such
as ``"... on a roof. he"``), and empty when the context ends a sentence.

Speed: the 4 endings of an item are scored as 4 full rows; rows of many items are
batched, longest first so that a batch pads little (right padding, which leaves the
real tokens' logits unchanged), and the LM head runs only at the continuation's
positions.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.data import context_length, tokenizer_adds_bos
from depthprune.errors import InputError
from depthprune.evaluate._model import logits_at, model_device, pad_id_of, right_pad
from depthprune.progress import counter

logger = logging.getLogger(__name__)

__all__ = [
    "HellaSwagConfig",
    "HellaSwagItem",
    "PreparedHellaSwag",
    "ending_loglikelihoods",
    "evaluate_hellaswag",
    "load_hellaswag",
    "predictions",
    "prepare_hellaswag",
    "preprocess",
    "split_context",
]

REFERENCE = "Zellers et al. 2019, HellaSwag; scored as lm-evaluation-harness's hellaswag task (0-shot, acc and acc_norm)"
N_ENDINGS = 4
_DATA_SUFFIXES = (".txt", ".bz2", ".jsonl", ".json")
# The end of a finished sentence: punctuation, maybe a closing quote, then a space.
_SENTENCE_END = re.compile(r"[.!?][\"']? ")
_ENDS_SENTENCE = re.compile(r"[.!?][\"']?\s*$")


# --------------------------------------------------------------------------- data


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning (``lm_eval/tasks/hellaswag/utils.py``)."""
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


@dataclass(frozen=True)
class HellaSwagItem:
    """One HellaSwag item, in the fields of the Hugging Face rows.

    Attributes:
        activity_label: The ActivityNet or WikiHow category, e.g. ``Roof shingle removal``.
        ctx_a: The finished sentences of the context.
        ctx_b: The unfinished sentence that the endings complete (may be empty).
        endings: The 4 candidate endings, as in the data.
        label: Index (0-3) of the right ending.
    """

    activity_label: str
    ctx_a: str
    ctx_b: str
    endings: tuple[str, str, str, str]
    label: int

    @property
    def query(self) -> str:
        """The context as the model reads it (lm-eval's ``query``)."""
        return preprocess(self.activity_label + ": " + self.ctx_a + " " + self.ctx_b.capitalize())

    @property
    def choices(self) -> tuple[str, ...]:
        """The cleaned endings (lm-eval's ``choices``); each is scored after a space."""
        return tuple(preprocess(e) for e in self.endings)


def split_context(line: str) -> tuple[str, str, str]:
    """Split a context line ``activity_label: ctx`` into ``(activity_label, ctx_a, ctx_b)``.

    ``ctx_b`` is the text after the last finished sentence when the context does not end
    one (``"A man is sitting on a roof. he"`` -> ``ctx_b = "he"``), else empty.

    Raises:
        InputError: the line has no ``": "`` after an activity label.
    """
    label, sep, ctx = line.partition(": ")
    if not sep or not label.strip():
        raise InputError(f"HellaSwag context {line[:60]!r} does not start with 'activity label: '")
    if _ENDS_SENTENCE.search(ctx):
        return label, ctx.strip(), ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return label, "", ctx.strip()
    cut = ends[-1].end()
    return label, ctx[:cut].strip(), ctx[cut:].strip()


def _lines(path: Path) -> Iterator[str]:
    """The lines of a text file (``.bz2`` decompressed on the fly), without line ends."""
    try:
        opener = bz2.open if path.name.endswith(".bz2") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                yield line.rstrip("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read HellaSwag file {str(path)!r}: {exc}") from exc


def _read_six_line(path: Path, limit: int | None) -> list[HellaSwagItem]:
    """Records of 6 lines: context, gold index, 4 endings; read only as far as ``limit``."""
    items: list[HellaSwagItem] = []
    record: list[str] = []
    for n, line in enumerate(_lines(path), start=1):
        record.append(line)
        if len(record) < 6:
            continue
        ctx, gold, *endings = record
        record = []
        if gold.strip() not in ("0", "1", "2", "3"):
            raise InputError(f"{path}:{n - 4}: gold index {gold!r} is not 0-3; is this a 6-line HellaSwag file?")
        label, ctx_a, ctx_b = split_context(ctx)
        items.append(HellaSwagItem(label, ctx_a, ctx_b, tuple(endings), int(gold)))  # type: ignore[arg-type]
        if limit is not None and len(items) >= limit:
            return items
    if any(line.strip() for line in record):
        raise InputError(
            f"{path} ends with a record of {len(record)} lines; expected records of 6 lines: a context line, "
            "the gold index 0-3 and 4 endings"
        )
    return items


def _read_jsonl(path: Path, limit: int | None) -> list[HellaSwagItem]:
    """JSON Lines with the fields of the Hugging Face rows."""
    items: list[HellaSwagItem] = []
    for n, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            endings = tuple(str(e) for e in row["endings"])
            item = HellaSwagItem(str(row["activity_label"]), str(row["ctx_a"]), str(row["ctx_b"]), endings, int(row["label"]))  # type: ignore[arg-type]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}:{n} is not a HellaSwag row ({type(exc).__name__}: {exc}); expected JSON with "
                "activity_label, ctx_a, ctx_b, endings and label"
            ) from exc
        if len(endings) != N_ENDINGS or not 0 <= item.label < N_ENDINGS:
            raise InputError(f"{path}:{n} has {len(endings)} endings and label {item.label}; expected 4 endings and a label 0-3")
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return items


def _data_file(path: Path) -> Path:
    """The data file of a target: the file itself, or the one data file of a folder."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"HellaSwag data {str(path)!r} does not exist; give hellaswag_val_full.txt(.bz2), a .jsonl file or their folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_DATA_SUFFIXES))
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise InputError(f"folder {str(path)!r} should hold one HellaSwag data file (.txt, .txt.bz2 or .jsonl); found {found}; give the file")
    return files[0]


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".json", ".jsonl.bz2"))


def load_hellaswag(source: str | os.PathLike[str], limit: int | None = None, skip: int = 0) -> list[HellaSwagItem]:
    """Read HellaSwag items in file order.

    Args:
        source: A 6-line text file (``.txt`` or ``.txt.bz2``), a JSON Lines file of
            Hugging Face rows, or a folder holding one of them.
        limit: Keep the first ``limit`` items (after ``skip``).
        skip: Leave out this many items at the start of the file.

    Raises:
        InputError: a missing file, a malformed record, no items.
    """
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")
    if skip < 0:
        raise InputError(f"skip must be 0 or more, got {skip}")
    path = _data_file(Path(source).expanduser())
    stop = None if limit is None else skip + limit
    items = (_read_jsonl(path, stop) if _is_jsonl(path) else _read_six_line(path, stop))[skip:]
    if not items:
        raise InputError(f"HellaSwag file {str(path)!r} holds no items")
    return items


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class HellaSwagConfig:
    """How HellaSwag is run.

    Attributes:
        limit: Items to score (the first ones after ``skip``); all when ``None``.
        skip: Items left out at the start of the file, so that two slices (say, one to
            choose units on and one to evaluate on) can be disjoint.
        max_length: Token budget of an input; default: the model's context (else 2048).
        batch_size: Rows (item endings) per forward pass.
        show_progress: Show a progress bar on a terminal.
    """

    limit: int | None = None
    skip: int = 0
    max_length: int | None = None
    batch_size: int = 32
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be at least 1, got {self.limit}")
        if self.skip < 0:
            raise InputError(f"skip must be 0 or more, got {self.skip}")
        if self.max_length is not None and self.max_length < 2:
            raise InputError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class PreparedHellaSwag:
    """Tokenized HellaSwag rows, ready to be scored any number of times (e.g. under masks).

    Attributes:
        items: The items, in file order.
        rows: Per item, per ending: ``(input ids, number of continuation tokens)``. The
            input is query + continuation without its last token, cut to ``max_length``
            from the left; its last ``n`` positions predict the continuation.
        targets: Per item, per ending: the continuation's token ids.
        max_length: The token budget of an input.
        n_truncated: Inputs that lost their start to fit ``max_length``.
        pad_id: Token that right-pads rows (never read).
    """

    items: tuple[HellaSwagItem, ...]
    rows: tuple[tuple[tuple[tuple[int, ...], int], ...], ...]
    targets: tuple[tuple[tuple[int, ...], ...], ...]
    max_length: int
    n_truncated: int
    pad_id: int = 0


def _encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """``(context ids, continuation ids)`` per pair, as lm-eval's ``HFLM._encode_pair``.

    Trailing spaces of the context move to the continuation; the context is tokenized
    alone, context + continuation whole, and the continuation is what the whole holds
    after the context's length. Special tokens are added as the tokenizer does by default.
    """
    moved = []
    for ctx, cont in pairs:
        n = len(ctx) - len(ctx.rstrip())
        moved.append((ctx[: len(ctx) - n], ctx[len(ctx) - n :] + cont) if n else (ctx, cont))
    contexts = sorted({c for c, _ in moved})
    ctx_ids = dict(zip(contexts, tokenizer(contexts, verbose=False)["input_ids"]))
    wholes = tokenizer([c + k for c, k in moved], verbose=False)["input_ids"]
    return [(list(ctx_ids[c]), list(w[len(ctx_ids[c]) :])) for (c, _), w in zip(moved, wholes)]


def prepare_hellaswag(tokenizer: Any, items: list[HellaSwagItem], max_length: int) -> PreparedHellaSwag:
    """Tokenize every ending of every item once.

    Raises:
        InputError: an ending adds no token, or more tokens than ``max_length``.
    """
    pairs = [(item.query, " " + choice) for item in items for choice in item.choices]
    encoded = _encode_pairs(tokenizer, pairs)
    rows, targets, n_truncated = [], [], 0
    for i, item in enumerate(items):
        item_rows, item_targets = [], []
        for ctx, cont in encoded[i * N_ENDINGS : (i + 1) * N_ENDINGS]:
            if not cont or len(cont) > max_length:
                raise InputError(
                    f"HellaSwag item {i} ({item.query[:40]!r}...) has an ending of {len(cont)} tokens; "
                    f"expected 1..{max_length} (max_length)"
                )
            whole = ctx + cont
            inp = whole[-(max_length + 1) :][:-1]  # as lm-eval: keep the end, drop the last token
            n_truncated += len(whole) - 1 > max_length
            item_rows.append((tuple(inp), len(cont)))
            item_targets.append(tuple(cont))
        rows.append(tuple(item_rows))
        targets.append(tuple(item_targets))
    return PreparedHellaSwag(tuple(items), tuple(rows), tuple(targets), max_length, n_truncated, pad_id_of(tokenizer))


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def _score_batch(model: nn.Module, batch: list[tuple[tuple[int, ...], int, tuple[int, ...]]], pad_id: int) -> list[float]:
    """Summed log-probability of each row's continuation (float64 sums of float32 log-probs)."""
    ids, mask = right_pad([list(inp) for inp, _, _ in batch], pad_id)  # (B, T)
    k = max(n for _, n, _ in batch)
    lengths = torch.tensor([len(inp) for inp, _, _ in batch])  # (B,)
    n_cont = torch.tensor([n for _, n, _ in batch])  # (B,)
    # The last n positions of a row predict its n continuation tokens.
    positions = (lengths - n_cont)[:, None] + torch.arange(k)[None, :]  # (B, K)
    valid = torch.arange(k)[None, :] < n_cont[:, None]  # (B, K)
    positions = torch.where(valid, positions, lengths[:, None] - 1)
    device = model_device(model)
    logits = logits_at(model, ids.to(device), mask.to(device), positions.to(device))  # (B, K, V)
    out = []
    for r, (_, n, target) in enumerate(batch):  # row by row: one float32 copy of (K, V) at a time
        logp = torch.log_softmax(logits[r, :n].float(), dim=-1)  # (n, V)
        picked = logp.gather(1, torch.tensor(target, device=logp.device)[:, None])  # (n, 1)
        out.append(float(picked.double().sum()))
    return out


def ending_loglikelihoods(model: nn.Module, prepared: PreparedHellaSwag, batch_size: int = 32, show_progress: bool = True) -> torch.Tensor:
    """The log-likelihood of every ending given its query.

    Args:
        model: A causal LM; units masked with :func:`depthprune.units.mask_units` stay masked.
        prepared: From :func:`prepare_hellaswag`; can be scored many times.
        batch_size: Rows per forward pass.
        show_progress: Show a progress bar on a terminal.

    Returns:
        ``(N, 4)`` float64 summed log-probabilities, in the order of ``prepared.items``.
    """
    flat = [(i, j) for i in range(len(prepared.items)) for j in range(N_ENDINGS)]
    # Longest first: rows of a batch have similar lengths, so little padding.
    flat.sort(key=lambda ij: len(prepared.rows[ij[0]][ij[1]][0]), reverse=True)
    scores = torch.zeros(len(prepared.items), N_ENDINGS, dtype=torch.float64)
    with counter(len(flat), "hellaswag", disable=not show_progress) as bar:
        for b in range(0, len(flat), batch_size):
            chunk = flat[b : b + batch_size]
            batch = [(*prepared.rows[i][j], prepared.targets[i][j]) for i, j in chunk]
            for (i, j), value in zip(chunk, _score_batch(model, batch, prepared.pad_id)):
                scores[i, j] = value
            bar.update(len(chunk))
    return scores


def _argmax(values: list[float]) -> int:
    """Index of the first maximum, as ``np.argmax``."""
    return max(range(len(values)), key=lambda j: (values[j], -j))


def predictions(scores: torch.Tensor, items: tuple[HellaSwagItem, ...] | list[HellaSwagItem]) -> tuple[list[int], list[int]]:
    """Chosen ending per item by summed log-likelihood (``acc``) and per character (``acc_norm``)."""
    plain, norm = [], []
    for row, item in zip(scores.tolist(), items):
        plain.append(_argmax(row))
        norm.append(_argmax([ll / len(c) if c else -math.inf for ll, c in zip(row, item.choices)]))
    return plain, norm


def _stderr(p: float, n: int) -> float | None:
    """Standard error of a mean of 0/1 values (sample standard deviation, as lm-eval)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def _items_sha256(items: list[HellaSwagItem]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.query, list(item.choices), item.label], ensure_ascii=False).encode())
    return h.hexdigest()


def evaluate_hellaswag(model: nn.Module, tokenizer: Any, source: str | os.PathLike[str], config: HellaSwagConfig | None = None) -> dict[str, Any]:
    """HellaSwag accuracy of ``model``, 0-shot, scored as lm-evaluation-harness does.

    Args:
        model: A causal LM, possibly with units masked.
        tokenizer: Its tokenizer.
        source: A 6-line HellaSwag file (``.txt``/``.txt.bz2``), a JSON Lines file of
            Hugging Face rows, or a folder holding one (see :func:`load_hellaswag`).
        config: Limit, batch size, max length.

    Returns:
        ``{"task": "hellaswag", "source", "acc_norm", "acc", "acc_norm_stderr",
        "acc_stderr", "metric", "n", "higher_is_better", "predictions",
        "predictions_norm", "labels", "protocol"}``; ``predictions`` are by summed
        log-likelihood, ``predictions_norm`` by log-likelihood per character.
    """
    config = config or HellaSwagConfig()
    if tokenizer is None:
        raise InputError("the model has no tokenizer; HellaSwag needs one to tokenize the endings")
    data_file = _data_file(Path(source).expanduser())
    items = load_hellaswag(data_file, config.limit, config.skip)
    max_length = config.max_length or context_length(model) or 2048
    prepared = prepare_hellaswag(tokenizer, items, max_length)
    scores = ending_loglikelihoods(model, prepared, config.batch_size, config.show_progress)
    plain, norm = predictions(scores, items)
    labels = [item.label for item in items]
    n = len(items)
    acc = sum(p == y for p, y in zip(plain, labels)) / n
    acc_norm = sum(p == y for p, y in zip(norm, labels)) / n
    protocol = {
        "format": "lm-evaluation-harness hellaswag, 0-shot",
        "query": "preprocess(activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize())",
        "continuation": "' ' + preprocess(ending)",
        "acc_norm": "summed log-likelihood / len(preprocess(ending)) in characters",
        "context_split": "ctx_a/ctx_b fields" if _is_jsonl(data_file) else "ctx_b = the unfinished sentence at the end",
        "data_file": str(data_file),
        "limit": config.limit,
        "skip": config.skip,
        "n": n,
        "max_length": max_length,
        "bos": tokenizer_adds_bos(tokenizer),
        "n_truncated": prepared.n_truncated,
        "items_sha256": _items_sha256(items),
        "reference": REFERENCE,
        "config": asdict(config),
    }
    logger.info("HellaSwag acc_norm %.4f, acc %.4f over %d items", acc_norm, acc, n)
    return {
        "task": "hellaswag",
        "source": str(source),
        "acc_norm": acc_norm,
        "acc": acc,
        "acc_norm_stderr": _stderr(acc_norm, n),
        "acc_stderr": _stderr(acc, n),
        "metric": "acc_norm",
        "n": n,
        "higher_is_better": True,
        "predictions": plain,
        "predictions_norm": norm,
        "labels": labels,
        "protocol": protocol,
    }
