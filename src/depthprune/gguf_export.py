"""Writing a pruned model as one GGUF file that llama.cpp (and so Ollama) runs.

A model of a Llama-layout family (an architecture file with ``"nemotron_nas": true``:
pre-norm, sequential residual, SwiGLU MLP) is written with the ``gguf`` package's writer:

* only whole blocks removed: the standard ``llama`` architecture, with fewer blocks;
* attention or MLP sublayers removed: llama.cpp's ``deci`` architecture (the one that runs
  NVIDIA's Nemotron-NAS models), whose ``head_count``, ``head_count_kv`` and
  ``feed_forward_length`` are per-layer arrays, 0 where the sublayer is gone. One
  exception: llama.cpp takes the head size from layer 0, so a removed attention in the
  first layer is written as a zero "linear attention" (see :func:`_as_written`).

The tokenizer is embedded (``tokenizer.ggml.*``) from the Hugging Face tokenizer by
:mod:`depthprune.gguf_vocab`: a byte-level BPE (GPT-2 style) as ``gpt2``, a
SentencePiece-style BPE with byte fallback as ``llama``. ``depthprune.json``'s content is stored under the metadata key
``depthprune.manifest``.

What this format refuses, before anything is written (:func:`check_gguf_emulators`,
:func:`check_gguf_family`):

* emulators that stay modules (llama.cpp has no module for an update computed from the
  residual stream); emulators folded into stock weights (:mod:`depthprune.recover.fold`)
  are plain weights and biases and export fine;
* sliding-window attention and RoPE scaling, which these writers do not translate.

A layer whose attention is kept but whose MLP is removed cannot be declared with a
feed-forward length of 0: llama.cpp's ``deci`` graph then skips the rest of the layer
(``if (n_ff == 0) continue;``) before the attention output is added to the residual, so it
would silently drop the attention too (``tests/test_gguf_llamacpp.py`` shows this against
llama.cpp itself). Such a layer is written with a zero stand-in MLP of width
:data:`ZERO_FFN` instead (see :func:`_as_written`), which adds exactly nothing.

Llama-layout GGUF files store the query and key projections with each head's rows
interleaved (llama.cpp's RoPE rotates adjacent pairs, transformers' rotates the two
halves), so :func:`_interleave_heads` reorders them; transformers' GGUF loader undoes the
same reordering on import.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from depthprune._fs import atomic_file, check_free_disk, check_output
from depthprune.architectures import ArchSpec, get_submodule
from depthprune.errors import InputError, check_choice
from depthprune.gguf_vocab import add_tokenizer, check_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["GGUF_TYPES", "GGUFLayer", "check_gguf_emulators", "estimate_gguf_bytes", "gguf_layers", "write_gguf"]

GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "bf16")
# Width of the zero MLP written for a layer that keeps its attention but lost its MLP: a
# multiple of 256 so that llama.cpp's k-quants (llama-quantize) can still quantize the file.
ZERO_FFN = 256
MANIFEST_KEY = "depthprune.manifest"
# Bytes of header, metadata and alignment padding beyond the tokenizer and the tensors.
_HEADER_SLACK = 1 << 20

# Llama-layout module names below the attention and MLP modules, and the GGUF tensor
# names llama.cpp's loader asks for (gguf.constants.TENSOR_NAMES for MODEL_ARCH.LLAMA/DECI).
_ATTN_PROJ = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}
_MLP_PROJ = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


@dataclass(frozen=True)
class GGUFLayer:
    """One layer as llama.cpp's ``deci`` hyperparameters describe it (0 = removed).

    ``stand_in_attn`` / ``stand_in_ffn`` mark zero sublayers written in place of removed
    ones that llama.cpp cannot declare as absent (see :func:`_as_written`).
    """

    n_head: int
    n_head_kv: int
    n_ff: int
    stand_in_attn: bool = False
    stand_in_ffn: bool = False


# --------------------------------------------------------------------------- checks


def _gguf_families() -> list[str]:
    from depthprune.architectures import all_specs

    return sorted(s.family for s in all_specs() if s.nemotron_nas)


def check_gguf_family(spec: ArchSpec, config: Any) -> None:
    """Refuse a family or config that the Llama-layout GGUF writers cannot express.

    Raises:
        InputError: the family is not Llama-layout, or the config uses a sliding window,
            RoPE scaling or a non-SiLU activation.
    """
    if not spec.nemotron_nas:
        raise InputError(
            f"the gguf format is written for the {', '.join(_gguf_families())} families; this model is "
            f"{spec.family!r}; use --format hf"
        )
    if getattr(config, "sliding_window", None) is not None:
        raise InputError(
            f"this model uses sliding-window attention (sliding_window={config.sliding_window}), which the gguf "
            "writer does not express; use --format hf"
        )
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise InputError(
            f"this model uses RoPE scaling {rope.get('rope_type')!r}, which the gguf writer does not express; "
            "use --format hf"
        )
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise InputError(f"this model's MLP activation is {act!r}; llama.cpp's llama/deci graphs use SiLU; use --format hf")


def check_gguf_emulators(emulated: list[str]) -> None:
    """Refuse emulators that stay modules (llama.cpp has none), before any weights are loaded.

    Every removal itself is expressible: see :func:`_as_written` for the layers llama.cpp
    cannot declare as absent.

    Args:
        emulated: ``"unit -> replacement"`` descriptions of emulators that stay modules.

    Raises:
        InputError: ``emulated`` is not empty.
    """
    if emulated:
        raise InputError(
            f"the gguf format cannot express emulators that stay modules ({', '.join(emulated)}): llama.cpp has no "
            "module for them; use --recover bias or linear:R where they fold into stock weights, --recover none, "
            "or --format hf"
        )


def check_gguf_type(gguf_type: str) -> str:
    """Return ``gguf_type`` when the writer supports it (``f32``, ``f16``, ``bf16``)."""
    return check_choice(gguf_type, GGUF_TYPES, "GGUF type")


# --------------------------------------------------------------------------- layout


def _rope(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope)
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    return rope


def _removed_slots(model: nn.Module) -> dict[int, set[str]]:
    """Layer (new index) -> sublayer kinds removed in place; emulated units are refused."""
    from depthprune.pruned_classes import depthprune_info, is_depthpruned

    if not is_depthpruned(model):
        return {}
    out: dict[int, set[str]] = {}
    emulated = []
    for entry in depthprune_info(model.config)["units"]:
        kind = str(entry["unit"]).split(".")[0]
        if entry["replace"] != "none":
            emulated.append(f"{entry['unit']} -> {entry['replace']}")
        out.setdefault(int(entry["layer"]), set()).update(("attn", "mlp") if kind == "block" else (kind,))
    check_gguf_emulators(emulated)
    return out


def gguf_layers(model: nn.Module) -> list[GGUFLayer]:
    """Each layer of a (pruned) Llama-layout model as llama.cpp's per-layer hyperparameters."""
    config = model.config
    n_layers = int(config.num_hidden_layers)
    gone = _removed_slots(model)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    ff = int(config.intermediate_size)
    return [
        GGUFLayer(
            n_head=0 if "attn" in gone.get(i, ()) else heads,
            n_head_kv=0 if "attn" in gone.get(i, ()) else kv,
            n_ff=0 if "mlp" in gone.get(i, ()) else ff,
        )
        for i in range(n_layers)
    ]


def _as_written(layers: list[GGUFLayer], config: Any, ffn_stand_in: bool = True) -> list[GGUFLayer]:
    """The layers as the file declares them, with zero stand-ins where llama.cpp needs one.

    * llama.cpp derives the head size from layer 0's head count (and reads
      ``attention.key_length`` only when that count is positive), so a ``deci`` file whose
      layer 0 has no attention fails to load. That layer is written instead as a ``deci``
      "linear attention" (``n_head > 0``, ``n_head_kv == 0``: the normed input times
      ``attn_output``) whose ``attn_output`` is zero, which adds exactly nothing: D x D
      zeros and one matrix product per token, no KV cache.
    * A layer that keeps its attention but lost its MLP gets an MLP of width
      :data:`ZERO_FFN` whose three matrices are zero: ``down(silu(gate x) * up x)`` is then
      exactly 0, where a declared width of 0 would make llama.cpp skip the attention too.
      ``ffn_stand_in=False`` writes the width 0 (only to show llama.cpp's behaviour).
    """
    out = []
    for i, s in enumerate(layers):
        if i == 0 and not s.n_head:
            s = GGUFLayer(int(config.num_attention_heads), 0, s.n_ff, stand_in_attn=True)
        if ffn_stand_in and s.n_head and not s.n_ff:
            s = GGUFLayer(s.n_head, s.n_head_kv, ZERO_FFN, stand_in_attn=s.stand_in_attn, stand_in_ffn=True)
        out.append(s)
    return out


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _interleave_heads(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' half-split RoPE to llama.cpp's pairs.

    Within a head of ``d`` rows, row ``j < d/2`` goes to ``2j`` and row ``d/2 + j`` to
    ``2j + 1``, so the pair that RoPE rotates together sits side by side.
    """
    rows = weight.shape[0]
    d = rows // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, d // 2, *rest).transpose(1, 2).reshape(rows, *rest)  # (H*d, ...)


def _tensors(model: nn.Module, spec: ArchSpec, layers: list[GGUFLayer]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(GGUF name, tensor)`` for every weight llama.cpp reads, in file order."""
    from depthprune.units import ModelLayout

    config = model.config
    layout = ModelLayout.of(model, spec)
    base = get_submodule(model, spec.layers.rsplit(".", 1)[0]) if "." in spec.layers else model
    embed = model.get_input_embeddings().weight
    yield "token_embd.weight", embed
    dim = int(config.hidden_size)
    for i, (layer, shape) in enumerate(zip(layout.layers, layers, strict=True)):
        if shape.stand_in_attn:
            yield f"blk.{i}.attn_norm.weight", torch.ones(dim)
            yield f"blk.{i}.attn_output.weight", torch.zeros(dim, dim)
        elif shape.n_head:
            (norm,) = spec.attn.pre_norms
            yield f"blk.{i}.attn_norm.weight", get_submodule(layer, norm).weight
            attn = get_submodule(layer, spec.attn.module)
            for gguf_name, attr in _ATTN_PROJ.items():
                proj = getattr(attn, attr)
                weight, bias = proj.weight, proj.bias
                if gguf_name in ("attn_q", "attn_k"):
                    heads = shape.n_head if gguf_name == "attn_q" else shape.n_head_kv
                    weight = _interleave_heads(weight, heads)
                    bias = None if bias is None else _interleave_heads(bias, heads)
                yield f"blk.{i}.{gguf_name}.weight", weight
                if bias is not None:
                    yield f"blk.{i}.{gguf_name}.bias", bias
        if shape.stand_in_ffn:
            yield f"blk.{i}.ffn_norm.weight", torch.ones(dim)
            yield f"blk.{i}.ffn_gate.weight", torch.zeros(shape.n_ff, dim)
            yield f"blk.{i}.ffn_up.weight", torch.zeros(shape.n_ff, dim)
            yield f"blk.{i}.ffn_down.weight", torch.zeros(dim, shape.n_ff)
        elif shape.n_ff:
            (norm,) = spec.mlp.pre_norms
            yield f"blk.{i}.ffn_norm.weight", get_submodule(layer, norm).weight
            mlp = get_submodule(layer, spec.mlp.module)
            for gguf_name, attr in _MLP_PROJ.items():
                proj = getattr(mlp, attr)
                yield f"blk.{i}.{gguf_name}.weight", proj.weight
                if proj.bias is not None:
                    yield f"blk.{i}.{gguf_name}.bias", proj.bias
    yield "output_norm.weight", base.norm.weight
    head = model.get_output_embeddings().weight
    if not (getattr(config, "tie_word_embeddings", False) and head.data_ptr() == embed.data_ptr()):
        yield "output.weight", head


def _as_numpy(t: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, Any]:
    """The array to write and its raw ggml type (``None``: inferred from the dtype)."""
    import gguf

    a = t.detach().to(torch.float32).cpu().numpy()
    # llama.cpp keeps 1-D tensors (norms, biases) in f32, as its converters do.
    if a.ndim == 1 or gguf_type == "f32":
        return np.ascontiguousarray(a), None
    if gguf_type == "f16":
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def _bytes_per_value(gguf_type: str, ndim: int) -> int:
    return 4 if ndim == 1 or gguf_type == "f32" else 2


def estimate_gguf_bytes(model: nn.Module, spec: ArchSpec, gguf_type: str, tokenizer: Any | None = None) -> int:
    """An upper estimate of the GGUF file's size: tensor bytes, padding, tokenizer and header."""
    layers = _as_written(gguf_layers(model), model.config)
    total = _HEADER_SLACK
    for _, t in _tensors(model, spec, layers):
        total += t.numel() * _bytes_per_value(gguf_type, t.dim()) + 32
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        total += sum(len(k.encode("utf-8")) + 16 for k in vocab) * 2  # tokens and merges
    return total


# --------------------------------------------------------------------------- writing


def _add_hparams(writer: Any, arch: str, layers: list[GGUFLayer], config: Any, n_vocab: int) -> None:
    """The ``{arch}.*`` keys: sizes (per layer for ``deci``), head size, RoPE base, norm epsilon."""
    writer.add_block_count(len(layers))
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_vocab_size(n_vocab)
    if arch == "llama":
        writer.add_feed_forward_length(layers[0].n_ff)
        writer.add_head_count(layers[0].n_head)
        writer.add_head_count_kv(layers[0].n_head_kv)
    else:
        writer.add_feed_forward_length([s.n_ff for s in layers])
        writer.add_head_count([s.n_head for s in layers])
        writer.add_head_count_kv([s.n_head_kv for s in layers])
    head_dim = _head_dim(config)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def write_gguf(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any,
    gguf_type: str = "f32",
    manifest: dict[str, Any] | None = None,
    force: bool = False,
    sources: dict[str, Any] | None = None,
    ffn_stand_in: bool = True,
) -> Path:
    """Write a (pruned) Llama-layout model and its tokenizer as one GGUF file, atomically.

    Args:
        model: A model of a Llama-layout family: plain (block-pruned or unpruned) or made
            by :func:`depthprune.pruned_classes.to_depthpruned_` with plain removals.
        out: The ``.gguf`` file to write.
        tokenizer: The model's Hugging Face tokenizer (fast), embedded as ``tokenizer.ggml.*``.
        gguf_type: ``f32``, ``f16`` or ``bf16`` for the matrices; norms and biases stay f32.
        manifest: Stored as JSON under the metadata key ``depthprune.manifest``.
        force: Replace an existing ``out``.
        sources: ``models`` and ``inputs`` the caller read, refused as or around ``out``
            (see :func:`depthprune._fs.check_target`).
        ffn_stand_in: Write a zero MLP where a layer keeps its attention but lost its MLP
            (see :func:`_as_written`); only the test that shows llama.cpp's behaviour
            without it turns this off.

    Returns:
        The written file.

    Raises:
        InputError: a type, family, tokenizer or plan the format cannot express, or not
            enough free disk for the file.
    """
    import gguf

    from depthprune.pruned_classes import spec_of

    check_gguf_type(gguf_type)
    spec = spec_of(model)
    config = model.config
    check_gguf_family(spec, config)
    layers = gguf_layers(model)
    check_tokenizer(tokenizer, int(model.get_input_embeddings().weight.shape[0]))
    out_path = check_output(out, force, "file", **(sources or {}))
    needed = estimate_gguf_bytes(model, spec, gguf_type, tokenizer)
    check_free_disk(out_path.absolute().parent, needed, "write elsewhere with -o, or choose --gguf-type f16")
    uniform = all(s == layers[0] and s.n_head and s.n_ff for s in layers)
    arch = "llama" if uniform else "deci"
    layers = _as_written(layers, config, ffn_stand_in)
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    with atomic_file(out_path, force, **(sources or {})) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(getattr(config, "_name_or_path", "") or "depthprune export").rsplit("/", 1)[-1] or "model")
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16}[gguf_type])
        _add_hparams(writer, arch, layers, config, n_vocab)
        add_tokenizer(writer, tokenizer, n_vocab)
        if manifest is not None:
            writer.add_string(MANIFEST_KEY, json.dumps(manifest))
        for name, tensor in _tensors(model, spec, layers):
            array, raw = _as_numpy(tensor, gguf_type)
            writer.add_tensor(name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    logger.info("wrote %s (%s, %s, %d layers)", out_path, arch, gguf_type, len(layers))
    return out_path
