"""Calibration and evaluation text turned into packed token batches.

A source is a local ``.txt`` file, a ``.jsonl`` file with a text field, a folder of such
files, or a Hugging Face dataset name (``name[:config][@split]``) when a hub can be
reached. Texts are tokenized without special tokens, joined with EOS between documents,
and cut into windows; ``n_sequences`` windows are drawn with a seeded generator. When the
tokenizer adds a BOS token by itself, every window starts with BOS, so windows look like
what the model saw in training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from depthprune.architectures import match_spec
from depthprune.devices import HOST
from depthprune.errors import InputError, first_line

logger = logging.getLogger(__name__)

DOC_SEPARATOR = "<|endoftext|>"
# org/name[:config][@split], e.g. Salesforce/wikitext:wikitext-2-raw-v1@train
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.%:\[\]-]+)?$")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class CalibrationInfo:
    """Where calibration tokens came from, recorded in every artifact."""

    source: str
    n_sequences: int
    seq_len: int
    n_tokens: int
    sha256: str
    seed: int
    bos: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenBatches:
    """Packed token ids ``(N, T)`` with their attention mask and provenance."""

    input_ids: torch.Tensor  # (N, T) int64
    attention_mask: torch.Tensor  # (N, T) int64, 1 = real token
    info: CalibrationInfo

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(input_ids, attention_mask)`` slices of at most ``batch_size`` rows."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rank_share(self) -> TokenBatches:
        """This torchrun rank's sequences (a contiguous block; all of them without torchrun).

        Raises:
            InputError: fewer sequences than ranks.
        """
        from depthprune.distributed import share, world

        size = world().size
        if size == 1:
            return self
        if len(self) < size:
            raise InputError(f"{len(self)} calibration sequences cannot be split across {size} ranks; give --samples >= {size}")
        rows = share(len(self))
        return TokenBatches(self.input_ids[rows.start : rows.stop], self.attention_mask[rows.start : rows.stop], self.info)


def read_utf8(path: Path) -> str:
    """The text of a file that must be UTF-8 (every text file depthprune reads as data).

    Raises:
        InputError: the file is not UTF-8; the message gives the byte offset of the first
            bad byte.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{str(path)!r} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} cannot be decoded; "
            "expected UTF-8 (convert it, e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line breaks.
    for line_no, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{line_no} is not valid JSON ({exc.msg}); expected one object per line") from exc
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise InputError(f"{path}:{line_no} has no string field {field!r}; pass --text-field to name another")
        texts.append(record[field])
    return texts


def _read_file(path: Path, field: str) -> list[str]:
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path, field)
    return read_utf8(path).split(DOC_SEPARATOR)


def read_texts(source: str | os.PathLike[str], text_field: str = "text") -> list[str]:
    """Read documents from a local file or folder, or a Hugging Face dataset.

    Args:
        source: A ``.txt``/``.jsonl`` file, a folder of them, or ``name[:config][@split]``.
        text_field: The field holding the text in JSONL records and datasets.

    Returns:
        The non-empty documents, in a deterministic order.

    Raises:
        InputError: the source is missing, unreadable or holds no text.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise InputError(f"folder {str(path)!r} has no {', '.join(TEXT_SUFFIXES)} files")
        texts = [t for f in files for t in _read_file(f, text_field)]
    elif path.is_file():
        texts = _read_file(path, text_field)
    elif _DATASET_ID.match(str(source)) and path.suffix not in TEXT_SUFFIXES:
        texts = _read_hf_dataset(str(source), text_field)
    else:
        raise InputError(f"data path {str(source)!r} does not exist")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"data source {str(source)!r} holds no text")
    return texts


def _read_hf_dataset(name: str, text_field: str) -> list[str]:
    """Load ``name[:config][@split]`` with the ``datasets`` library (needs a reachable hub)."""
    try:
        import datasets
    except ImportError as exc:
        raise InputError(f"{name!r} is not a local file, and reading Hub datasets needs `pip install datasets`") from exc
    split = "train"
    if "@" in name:
        name, split = name.rsplit("@", 1)
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many unrelated types for "not reachable"
        first = first_line(exc)
        raise InputError(f"cannot load dataset {name!r} (config {config}, split {split}): {first}") from exc
    if text_field not in ds.column_names:
        raise InputError(f"dataset {name!r} has no column {text_field!r}; columns: {', '.join(ds.column_names)}")
    return list(ds[text_field])


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends its BOS token when asked for special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def token_stream(texts: list[str], tokenizer: Any) -> list[int]:
    """Tokenize documents without special tokens and join them with EOS (when there is one)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    # verbose=False: the documents are cut into windows afterwards, so transformers' warning
    # that a document is longer than the model's context does not apply.
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    for ids in encoded:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    return stream


def context_length(model: Any) -> int | None:
    """The model's maximum context, or ``None`` if its config does not say.

    The config key comes from the family's architecture file (``config.max_positions``);
    a model of no known family has no known context.

    Args:
        model: A model, or its Hugging Face config.
    """
    config = getattr(model, "config", model)
    spec = match_spec(config)
    return spec.max_positions(config) if spec is not None else None


def pack(
    stream: list[int],
    n_sequences: int,
    seq_len: int,
    seed: int = 0,
    bos_id: int | None = None,
    source: str = "<tokens>",
) -> TokenBatches:
    """Cut a token stream into ``n_sequences`` windows of ``seq_len`` tokens.

    Windows do not overlap. When the stream holds more windows than asked for, a seeded
    generator picks which ones (kept in stream order); when it holds fewer, all are used
    and a warning is logged.

    Raises:
        InputError: the stream is shorter than one window.
    """
    if n_sequences < 1 or seq_len < 2:
        raise InputError(f"need at least 1 sequence of at least 2 tokens, got {n_sequences} x {seq_len}")
    body = seq_len - (1 if bos_id is not None else 0)
    available = len(stream) // body
    if available == 0:
        raise InputError(
            f"data {source!r} has {len(stream)} tokens, shorter than one sequence of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    if available < n_sequences:
        logger.warning("data %s holds only %d sequences of %d tokens (asked for %d)", source, available, seq_len, n_sequences)
        chosen = list(range(available))
    else:
        g = torch.Generator().manual_seed(seed)
        chosen = sorted(torch.randperm(available, generator=g, device=HOST)[:n_sequences].tolist())
    flat = torch.tensor(stream[: available * body], dtype=torch.long, device=HOST).view(available, body)
    ids = flat[chosen]
    if bos_id is not None:
        ids = torch.cat([torch.full((len(chosen), 1), bos_id, dtype=torch.long, device=HOST), ids], dim=1)
    ids = ids.contiguous()
    info = CalibrationInfo(
        source=source,
        n_sequences=int(ids.shape[0]),
        seq_len=seq_len,
        n_tokens=int(ids.numel()),
        sha256=hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest(),
        seed=seed,
        bos=bos_id is not None,
    )
    from depthprune.distributed import check_same

    check_same("calibration data", info.sha256)
    return TokenBatches(input_ids=ids, attention_mask=torch.ones_like(ids), info=info)


def load_calibration(
    source: str | os.PathLike[str],
    tokenizer: Any,
    n_sequences: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    max_context: int | None = None,
    text_field: str = "text",
) -> TokenBatches:
    """Read, tokenize and pack calibration text.

    Args:
        source: See :func:`read_texts`.
        tokenizer: A Hugging Face tokenizer.
        n_sequences: How many windows (N).
        seq_len: Tokens per window (T), capped by ``max_context``.
        seed: Chooses the windows.
        max_context: The model's context length, if known.
        text_field: Field of JSONL records and dataset rows that holds the text.
    """
    if tokenizer is None:
        raise InputError("the model has no tokenizer; calibration text cannot be tokenized")
    if max_context is not None and seq_len > max_context:
        logger.info("seq_len %d capped at the model's context %d", seq_len, max_context)
        seq_len = max_context
    texts = read_texts(source, text_field)
    stream = token_stream(texts, tokenizer)
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    return pack(stream, n_sequences, seq_len, seed=seed, bos_id=bos_id, source=str(source))
