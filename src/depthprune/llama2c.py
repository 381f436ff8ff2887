"""Convert a llama2.c checkpoint and tokenizer into a Hugging Face Llama folder.

llama2.c (Karpathy) stores a model as one flat little-endian file, the "legacy" version 0
format written by ``export.py --version 0``:

* A header of 7 int32: ``dim``, ``hidden_dim``, ``n_layers``, ``n_heads``, ``n_kv_heads``,
  ``vocab_size``, ``seq_len``. A positive ``vocab_size`` means the classifier is tied to
  the token embedding; a negative one means an untied classifier is stored at the end.
* float32 arrays, each row-major with the output features first (like ``nn.Linear``):
  ``token_embedding_table`` (V, D); ``rms_att_weight`` (L, D); ``wq`` (L, H*hd, D);
  ``wk`` (L, KV*hd, D); ``wv`` (L, KV*hd, D); ``wo`` (L, D, H*hd); ``rms_ffn_weight``
  (L, D); ``w1`` (L, F, D); ``w2`` (L, D, F); ``w3`` (L, F, D); ``rms_final_weight`` (D,).
* Optionally the RoPE tables ``freq_cis_real`` and ``freq_cis_imag`` (seq_len, hd/2 each),
  which are recomputed by every loader and so are skipped here.
* When ``vocab_size`` is negative, the classifier ``wcls`` (V, D) follows.

llama2.c rotates interleaved pairs (0, 1), (2, 3), ... of each head, while Hugging Face
Llama rotates the two halves of each head, so the rows of ``wq`` and ``wk`` are permuted
per head. RMSNorm uses eps 1e-5 and RoPE uses theta 10000.

The tokenizer file (``tok512.bin``, ``tokenizer.bin``) holds an int32
``max_token_length``, then for each token a float32 score, an int32 byte length and the
UTF-8 bytes of the piece. Pieces use a plain space where sentencepiece uses "▁"; ids 0, 1
and 2 are ``<unk>``, BOS and EOS (stored as ``"\\n<s>\\n"`` and ``"\\n</s>\\n"``), and ids
3..258 are the byte-fallback pieces ``<0x00>``..``<0xFF>``. llama2.c encodes a text by
prepending the piece for " " when the text is not empty, mapping each UTF-8 character to
its piece (or to its byte pieces), then repeatedly merging the adjacent pair whose merged
piece has the highest score, leftmost first on ties. The converted ``tokenizer.json`` is a
BPE model with byte fallback whose merges are ranked by those scores, so it gives the same
ids.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from depthprune._fs import atomic_dir, check_output
from depthprune.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

__all__ = ["convert_llama2c", "read_llama2c_checkpoint", "read_llama2c_tokenizer"]

_HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_HEADER_BYTES = 4 * len(_HEADER_FIELDS)
# Generous ceilings: far above any real llama2.c model, far below values that only come
# from reading a file that is not a checkpoint at all.
_HEADER_LIMITS = {
    "dim": 1 << 16,
    "hidden_dim": 1 << 18,
    "n_layers": 1 << 10,
    "n_heads": 1 << 10,
    "n_kv_heads": 1 << 10,
    "vocab_size": 1 << 21,
    "seq_len": 1 << 20,
}
# llama2.c export.py versions >= 1 start with this magic ("ak42" as a little-endian uint32).
_LLAMA2C_MAGIC = 0x616B3432
_MAX_PIECE_BYTES = 1 << 16
_N_SPECIAL = 3  # <unk>, BOS, EOS
_N_BYTES = 256
_UNK, _BOS, _EOS = "<unk>", "<s>", "</s>"


def _check_file(path: str | os.PathLike[str], what: str) -> Path:
    """Return ``path`` as a ``Path`` after checking that it is an existing regular file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {str(p)!r} does not exist; expected a llama2.c {what} file; check the path")
    if not p.is_file():
        raise CheckpointError(
            f"{what} {str(p)!r} is not a regular file; expected a llama2.c {what} file; pass the file, not a folder"
        )
    return p


def _layout(cfg: dict[str, int], shared: bool, with_freq_cis: bool) -> list[tuple[str, tuple[int, ...]]]:
    """List the arrays stored after the header, in file order, with their shapes."""
    d, f, n_layers = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    head_dim = d // cfg["n_heads"]
    kv_dim = head_dim * cfg["n_kv_heads"]
    v = cfg["vocab_size"]
    arrays: list[tuple[str, tuple[int, ...]]] = [
        ("token_embedding_table", (v, d)),
        ("rms_att_weight", (n_layers, d)),
        ("wq", (n_layers, d, d)),
        ("wk", (n_layers, kv_dim, d)),
        ("wv", (n_layers, kv_dim, d)),
        ("wo", (n_layers, d, d)),
        ("rms_ffn_weight", (n_layers, d)),
        ("w1", (n_layers, f, d)),
        ("w2", (n_layers, d, f)),
        ("w3", (n_layers, f, d)),
        ("rms_final_weight", (d,)),
    ]
    if with_freq_cis:
        table = (cfg["seq_len"], head_dim // 2)
        arrays += [("freq_cis_real", table), ("freq_cis_imag", table)]
    if not shared:
        arrays.append(("wcls", (v, d)))
    return arrays


def _n_floats(layout: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(int(np.prod(shape)) for _, shape in layout)


def _validate_header(path: Path, raw: dict[str, int]) -> None:
    if raw["dim"] == _LLAMA2C_MAGIC:
        raise CheckpointError(
            f"checkpoint {str(path)!r} uses llama2.c export format version >= 1 (magic 'ak42'); "
            "expected the legacy version 0 format; re-export it with llama2.c's export.py --version 0"
        )
    for name in _HEADER_FIELDS:
        value = abs(raw[name]) if name == "vocab_size" else raw[name]
        if not 0 < value <= _HEADER_LIMITS[name]:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has header {name}={raw[name]}; expected 1..{_HEADER_LIMITS[name]} "
                f"(header {raw}); pass a llama2.c version 0 checkpoint"
            )
    dim, n_heads, n_kv = raw["dim"], raw["n_heads"], raw["n_kv_heads"]
    if dim % n_heads or (dim // n_heads) % 2 or n_kv > n_heads or n_heads % n_kv:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv}; expected dim "
            "divisible by n_heads into an even head size and n_heads a multiple of n_kv_heads; "
            "pass a llama2.c version 0 checkpoint"
        )


def read_llama2c_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a llama2.c version 0 checkpoint without loading any pickle.

    Args:
        path: The ``.bin`` checkpoint.

    Returns:
        ``(config, arrays)``. ``config`` holds the header fields (``vocab_size`` made
        positive) plus ``shared_classifier`` and ``has_freq_cis``. ``arrays`` maps the
        llama2.c names (``token_embedding_table``, ``rms_att_weight``, ``wq``, ``wk``, ``wv``,
        ``wo``, ``rms_ffn_weight``, ``w1``, ``w2``, ``w3``, ``rms_final_weight`` and, when
        untied, ``wcls``) to float32 arrays shaped as in the module docstring. The RoPE
        tables are skipped.

    Raises:
        InputError: ``path`` does not exist.
        CheckpointError: the file is a folder, its header is implausible, or its size does
            not match what the header implies.
    """
    p = _check_file(path, "checkpoint")
    size = p.stat().st_size
    if size < _HEADER_BYTES:
        raise CheckpointError(
            f"checkpoint {str(p)!r} has {size} bytes; expected at least a {_HEADER_BYTES}-byte header; "
            "pass a complete llama2.c checkpoint"
        )
    header = np.fromfile(p, dtype="<i4", count=len(_HEADER_FIELDS))
    raw = {name: int(v) for name, v in zip(_HEADER_FIELDS, header, strict=True)}
    _validate_header(p, raw)
    shared = raw["vocab_size"] > 0
    cfg = dict(raw, vocab_size=abs(raw["vocab_size"]))

    candidates = {}
    for with_freq_cis in (True, False):
        layout = _layout(cfg, shared, with_freq_cis)
        candidates[_HEADER_BYTES + 4 * _n_floats(layout)] = (with_freq_cis, layout)
    if size not in candidates:
        expected = " or ".join(str(s) for s in sorted(candidates))
        state = "truncated" if size < min(candidates) else "not a valid layout (trailing or missing data)"
        raise CheckpointError(
            f"checkpoint {str(p)!r} has {size} bytes but its header {raw} implies {expected} bytes "
            f"(with/without the freq_cis tables); the file is {state}; re-download or re-export it"
        )
    with_freq_cis, layout = candidates[size]

    flat = np.fromfile(p, dtype="<f4", offset=_HEADER_BYTES)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in layout:
        n = int(np.prod(shape))
        if not name.startswith("freq_cis"):
            arrays[name] = flat[offset : offset + n].reshape(shape).astype(np.float32, copy=False)
        offset += n
    bad = [name for name, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(p)!r} has NaN or infinite values in {bad}; expected finite float32 weights; "
            "re-download or re-export it"
        )
    cfg["shared_classifier"] = shared
    cfg["has_freq_cis"] = with_freq_cis
    logger.debug("read llama2c checkpoint %s: %s", p, cfg)
    return cfg, arrays


def read_llama2c_tokenizer(path: str | os.PathLike[str]) -> tuple[list[str], list[float], int]:
    """Read a llama2.c tokenizer file.

    Args:
        path: The tokenizer ``.bin`` file (for example ``tok512.bin``).

    Returns:
        ``(pieces, scores, max_token_length)``: the piece strings exactly as llama2.c
        stores them (BOS is ``"\\n<s>\\n"``), their float scores, and the header value.

    Raises:
        InputError: ``path`` does not exist.
        CheckpointError: the file is a folder, truncated, or malformed.
    """
    p = _check_file(path, "tokenizer")
    data = p.read_bytes()
    hint = "pass the tokenizer .bin written by llama2.c's tokenizer.py --tokenizer-model"
    if len(data) < 4:
        raise CheckpointError(f"tokenizer {str(p)!r} has {len(data)} bytes; expected at least a 4-byte header; {hint}")
    max_len = int(np.frombuffer(data, dtype="<i4", count=1)[0])
    if not 0 < max_len <= _MAX_PIECE_BYTES:
        raise CheckpointError(
            f"tokenizer {str(p)!r} has max_token_length={max_len}; expected 1..{_MAX_PIECE_BYTES}; {hint}"
        )
    pieces: list[str] = []
    scores: list[float] = []
    pos = 4
    while pos < len(data):
        i = len(pieces)
        if pos + 8 > len(data):
            raise CheckpointError(
                f"tokenizer {str(p)!r} is truncated in the record of token {i} at byte {pos} of {len(data)}; "
                f"expected an 8-byte score and length; {hint}"
            )
        score = float(np.frombuffer(data, dtype="<f4", count=1, offset=pos)[0])
        length = int(np.frombuffer(data, dtype="<i4", count=1, offset=pos + 4)[0])
        pos += 8
        if not 0 < length <= max_len:
            raise CheckpointError(
                f"tokenizer {str(p)!r} gives token {i} a length of {length} bytes; expected 1..{max_len} "
                f"(max_token_length); {hint}"
            )
        if pos + length > len(data):
            raise CheckpointError(
                f"tokenizer {str(p)!r} is truncated in token {i}: it needs {length} bytes at byte {pos} "
                f"but the file has {len(data)}; {hint}"
            )
        try:
            piece = data[pos : pos + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"tokenizer {str(p)!r} token {i} is not valid UTF-8 ({exc}); {hint}") from exc
        if not np.isfinite(score):
            raise CheckpointError(f"tokenizer {str(p)!r} token {i} has score {score}; expected a finite float; {hint}")
        pieces.append(piece)
        scores.append(score)
        pos += length
    return pieces, scores, max_len


def _check_tokenizer(path: Path, pieces: list[str], vocab_size: int) -> None:
    """Check that the tokenizer fits the model and has the sentencepiece byte-fallback layout."""
    if len(pieces) != vocab_size:
        raise CheckpointError(
            f"tokenizer {str(path)!r} has {len(pieces)} tokens but the checkpoint has vocab_size={vocab_size}; "
            "expected the tokenizer the model was trained with; pass the matching tokenizer file"
        )
    expected_bytes = [f"<0x{b:02X}>" for b in range(_N_BYTES)]
    if vocab_size < _N_SPECIAL + _N_BYTES or pieces[_N_SPECIAL : _N_SPECIAL + _N_BYTES] != expected_bytes:
        raise CheckpointError(
            f"tokenizer {str(path)!r} does not hold the byte pieces <0x00>..<0xFF> at ids 3..258; expected a "
            "sentencepiece BPE vocabulary with byte fallback; pass a llama2.c tokenizer exported from such a model"
        )
    if len(set(pieces)) != len(pieces):
        raise CheckpointError(
            f"tokenizer {str(path)!r} repeats pieces; expected {len(pieces)} distinct pieces; "
            "pass a valid llama2.c tokenizer"
        )
    if " " not in pieces:
        raise CheckpointError(
            f"tokenizer {str(path)!r} has no piece for ' ' (the dummy prefix); expected a llama2.c sentencepiece "
            "vocabulary; pass a valid llama2.c tokenizer"
        )


def _hf_vocab(pieces: list[str]) -> list[str]:
    """Return the token strings used in ``tokenizer.json``: llama2.c pieces with HF special names."""
    return [_UNK, _BOS, _EOS, *pieces[_N_SPECIAL:]]


def _bpe_merges(vocab: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Derive BPE merges whose rank order reproduces llama2.c's best-score-first merging.

    Every split of a piece into two pieces is a merge; merges are ranked by the score of
    the merged piece, highest first. When several splits give one piece, the one with the
    shorter left part ranks first, which picks the leftmost merge in runs such as "aaa".
    """
    ids = {s: i for i, s in enumerate(vocab)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i in range(_N_SPECIAL, len(vocab)):
        piece = vocab[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if ids.get(left, 0) >= _N_SPECIAL and ids.get(right, 0) >= _N_SPECIAL:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_tokenizer(pieces: list[str], scores: list[float]) -> Any:
    """Build the ``tokenizers.Tokenizer`` equivalent to the llama2.c encoder and decoder."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
    )

    vocab = _hf_vocab(pieces)
    bpe = models.BPE(
        vocab={s: i for i, s in enumerate(vocab)},
        merges=_bpe_merges(vocab, scores),
        unk_token=_UNK,
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = Tokenizer(bpe)
    # Prepend skips empty strings, which is exactly llama2.c's "dummy prefix unless empty".
    tok.normalizer = normalizers.Prepend(" ")
    tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_BOS}:0 $A:0", pair=f"{_BOS}:0 $A:0 {_BOS}:1 $B:1", special_tokens=[(_BOS, 1)]
    )
    # Fuse before Strip so that only the single dummy space at the very start is removed.
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (_UNK, _BOS, _EOS)])
    return tok


def _hf_state_dict(cfg: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Map llama2.c arrays to Hugging Face Llama parameter names, permuting wq and wk."""
    import torch

    n_heads, n_kv = cfg["n_heads"], cfg["n_kv_heads"]

    def rope_halves(w: np.ndarray, heads: int) -> np.ndarray:
        # Rows of each head go from interleaved pairs (i, 2) to halves (2, i).
        out_dim, in_dim = w.shape
        return w.reshape(heads, out_dim // heads // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    sd = {
        "model.embed_tokens.weight": t(arrays["token_embedding_table"]),
        "model.norm.weight": t(arrays["rms_final_weight"]),
    }
    for i in range(cfg["n_layers"]):
        pre = f"model.layers.{i}"
        sd[f"{pre}.input_layernorm.weight"] = t(arrays["rms_att_weight"][i])
        sd[f"{pre}.self_attn.q_proj.weight"] = t(rope_halves(arrays["wq"][i], n_heads))
        sd[f"{pre}.self_attn.k_proj.weight"] = t(rope_halves(arrays["wk"][i], n_kv))
        sd[f"{pre}.self_attn.v_proj.weight"] = t(arrays["wv"][i])
        sd[f"{pre}.self_attn.o_proj.weight"] = t(arrays["wo"][i])
        sd[f"{pre}.post_attention_layernorm.weight"] = t(arrays["rms_ffn_weight"][i])
        sd[f"{pre}.mlp.gate_proj.weight"] = t(arrays["w1"][i])
        sd[f"{pre}.mlp.down_proj.weight"] = t(arrays["w2"][i])
        sd[f"{pre}.mlp.up_proj.weight"] = t(arrays["w3"][i])
    if not cfg["shared_classifier"]:
        sd["lm_head.weight"] = t(arrays["wcls"])
    return sd


def _write_model(cfg: dict[str, Any], arrays: dict[str, np.ndarray], folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["dim"],
        intermediate_size=cfg["hidden_dim"],
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_heads"],
        head_dim=cfg["dim"] // cfg["n_heads"],
        hidden_act="silu",
        max_position_embeddings=cfg["seq_len"],
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=cfg["shared_classifier"],
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    # Built on the CPU rather than the meta device so that buffers outside the state dict
    # (RoPE inv_freq) are real; the random init is cheap at llama2.c sizes.
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(_hf_state_dict(cfg, arrays), strict=False)
    missing = [k for k in missing if not (cfg["shared_classifier"] and k == "lm_head.weight")]
    if missing or unexpected:  # a bug here, not bad input
        raise RuntimeError(f"llama2c conversion produced a wrong state dict: missing={missing} unexpected={unexpected}")
    model.eval()
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(folder)


def _write_tokenizer(pieces: list[str], scores: list[float], seq_len: int, folder: Path) -> None:
    tok = _build_tokenizer(pieces, scores)
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        # TokenizersBackend loads tokenizer.json as written; LlamaTokenizer would rebuild a
        # Metaspace ("▁") pipeline that does not match llama2.c's plain-space pieces.
        "tokenizer_class": "TokenizersBackend",
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": seq_len,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _UNK}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def convert_llama2c(
    checkpoint: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
) -> Path:
    """Convert a llama2.c checkpoint and tokenizer into a Hugging Face Llama folder.

    The folder holds ``config.json`` (``LlamaForCausalLM``), ``model.safetensors``,
    ``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json``, and loads
    offline with ``AutoModelForCausalLM`` and ``AutoTokenizer``. It is written to a
    temporary sibling and renamed at the end, so a failure leaves nothing behind.

    Args:
        checkpoint: The llama2.c version 0 checkpoint (``.bin``).
        tokenizer: The llama2.c tokenizer file (``tok512.bin``, ``tokenizer.bin``).
        out: The folder to create.
        force: Replace ``out`` if it exists.

    Returns:
        The output folder.

    Raises:
        InputError: an input file does not exist, or the parent of ``out`` is missing.
        CheckpointError: an input file is malformed, truncated, or does not match the other.
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    check_output(out, force, "dir", models=[checkpoint, tokenizer])  # fail before reading anything
    cfg, arrays = read_llama2c_checkpoint(checkpoint)
    pieces, scores, _ = read_llama2c_tokenizer(tokenizer)
    _check_tokenizer(Path(tokenizer), pieces, cfg["vocab_size"])
    with atomic_dir(out, force, models=[checkpoint, tokenizer]) as tmp:
        _write_model(cfg, arrays, tmp)
        _write_tokenizer(pieces, scores, cfg["seq_len"], tmp)
    logger.info("converted llama2c %s (%s) into %s", checkpoint, cfg, out)
    return Path(out)
