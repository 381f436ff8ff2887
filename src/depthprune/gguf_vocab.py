"""The tokenizer of a GGUF export: a Hugging Face fast tokenizer as ``tokenizer.ggml.*`` metadata.

Two kinds are written, the two that llama.cpp's Llama-layout models use:

* byte-level BPE with GPT-2's split (``ByteLevel`` pre-tokenizer with its regex) as
  ``tokenizer.ggml.model = "gpt2"``, ``pre = "gpt-2"``, with the merges;
* SentencePiece-style BPE (no pre-tokenizer, byte fallback) as ``"llama"``: llama.cpp's SPM
  tokenizer, which merges the highest-scoring pair first, so each token scores minus the
  rank of the merge that makes it, and spaces are written as U+2581.

Anything else (other split regexes, WordPiece, Unigram) is refused: llama.cpp would
tokenize it differently from the model's own tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from depthprune.errors import InputError

__all__ = ["add_tokenizer", "check_tokenizer"]


@dataclass(frozen=True)
class _Vocab:
    model: str  # tokenizer.ggml.model
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise InputError(
            f"cannot embed a {type(tokenizer).__name__} in GGUF: it has no fast (tokenizers) backend; "
            "save the model with a tokenizer.json"
        )
    return json.loads(backend.to_str())


def _pre_tokenizers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pre = doc.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else ([pre] if pre else [])


def _vocab(tokenizer: Any, n_vocab: int) -> _Vocab:
    """The tokenizer as llama.cpp's vocabulary metadata, or an error naming what is missing."""
    import gguf

    doc = _tokenizer_json(tokenizer)
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(
            f"cannot embed a {model.get('type')!r} tokenizer in GGUF; the writer handles byte-level BPE (GPT-2 style) "
            "and SentencePiece-style BPE; use --format hf"
        )
    pres = _pre_tokenizers(doc)
    byte_level = [p for p in pres if p.get("type") == "ByteLevel"]
    if len(pres) == 1 and byte_level and byte_level[0].get("use_regex", True):
        kind, pre = "gpt2", "gpt-2"  # GPT-2's split regex, which llama.cpp calls "gpt-2"
    elif not pres and model.get("byte_fallback"):
        kind, pre = "llama", None  # SentencePiece: llama.cpp's SPM tokenizer, scores from merge ranks
    else:
        raise InputError(
            "cannot embed this tokenizer in GGUF: its pre-tokenizer "
            f"({', '.join(str(p.get('type')) for p in pres) or 'none'}) is not one llama.cpp is known to match here; "
            "use --format hf"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(a["id"]): a for a in doc.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    size = max(n_vocab, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(gguf.TokenType.NORMAL)
    for i, a in added.items():
        types[i] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    raw_merges = model.get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    scores = None
    if kind == "llama":
        # llama.cpp's SPM tokenizer merges the highest-scoring pair first; BPE merges by
        # rank, so a token made by merge r scores -r (earlier merges win).
        made = ["".join(m) if not isinstance(m, str) else "".join(m.split(" ", 1)) for m in raw_merges]
        rank = {token: r for r, token in reversed(list(enumerate(made)))}
        scores = [0.0] * size
        for text, i in vocab.items():
            if text in rank:
                scores[i] = -float(rank[text])
            elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = int(gguf.TokenType.BYTE)
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = int(gguf.TokenType.UNKNOWN)
        # llama.cpp's SPM tokenizer writes a space as U+2581 before looking tokens up; some
        # tokenizer.json files (llama2.c conversions) keep plain spaces in the vocabulary.
        for text, i in vocab.items():
            if types[i] == int(gguf.TokenType.NORMAL):
                tokens[i] = text.replace(" ", "\u2581")
        merges = []
    return _Vocab(model=kind, pre=pre, tokens=tokens, types=types, scores=scores, merges=merges)


def check_tokenizer(tokenizer: Any, n_vocab: int) -> None:
    """Refuse a tokenizer that cannot be embedded (see the module docstring).

    Raises:
        InputError: it has no fast backend, is of a kind not written here, or has more
            tokens than the embedding has rows.
    """
    vocab = _vocab(tokenizer, n_vocab)
    if len(vocab.tokens) != n_vocab:
        raise InputError(
            f"the tokenizer has {len(vocab.tokens)} tokens but the embedding has {n_vocab} rows; "
            "GGUF needs one token per row; use --format hf"
        )


def add_tokenizer(writer: Any, tokenizer: Any, n_vocab: int) -> None:
    """Add ``tokenizer`` to a ``gguf.GGUFWriter`` as ``tokenizer.ggml.*`` and ``tokenizer.chat_template``."""
    check_tokenizer(tokenizer, n_vocab)
    vocab = _vocab(tokenizer, n_vocab)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for name, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= 0:
            add(value)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    writer.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    writer.add_add_eos_token(bool(probe) and eos is not None and probe[-1] == eos and len(probe) > 1)
    if vocab.model == "llama":
        writer.add_add_space_prefix(True)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
