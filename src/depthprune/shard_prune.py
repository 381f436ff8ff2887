"""Pruning a safetensors checkpoint without loading the model.

Removing units with no emulator changes no weight: it drops some tensors and renumbers the
layers of the others. This module does exactly that on the files, tensor by tensor, so a
model larger than memory can be pruned:

1. The model's skeleton is built on the ``meta`` device (no weights) and pruned with the
   same functions as the in-memory path (:func:`depthprune.prune.prune_`, or
   :func:`depthprune.pruned_classes.to_depthpruned_` when sublayers go). Which checkpoint
   tensor becomes which name is read off that skeleton by tensor identity, so it follows
   the model's structure (its decoder ``ModuleList``), not a guess over names; the pruned
   skeleton's config is the config written.
2. Each input shard is rewritten into one output shard by :func:`write_safetensors`:
   the header is computed first, then each kept tensor's bytes are copied in bounded
   chunks (or cast one tensor at a time when a ``dtype`` is asked for). Peak memory is a
   chunk, or one tensor when casting, not the model.

The result holds the same tensor names, dtypes and bytes as loading the model, pruning it
in memory and calling ``save_pretrained`` (tested against that path). Names that
transformers renames between module and file (GPT-NeoX's ``embed_out``) are followed with
its own conversion mapping. When the checkpoint does not map one-to-one onto the skeleton
(tensors merged or split on load, names from an older layout, missing or duplicated tied
tensors), :func:`plan_rewrite` returns ``None`` and the caller loads the model instead.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from depthprune.errors import CheckpointError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_CHUNK = 16 << 20  # bytes copied at a time; bounds the memory of a raw copy
_HEADER_ALIGN = 8  # safetensors pads its JSON header to a multiple of 8 bytes
_METADATA = {"format": "pt"}  # what save_pretrained writes
_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: dtype code, shape, and byte range in the data area."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsFile:
    """The parsed header of a safetensors file.

    Attributes:
        path: The file.
        data_start: Offset of the data area (8 + header length).
        tensors: Name -> entry, in header order.
        metadata: The ``__metadata__`` dict, if any.
    """

    path: Path
    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None


def read_header(path: Path) -> SafetensorsFile:
    """Parse a safetensors file's header without reading its tensors.

    Raises:
        CheckpointError: the file is truncated or its header is not valid JSON.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"cannot load the weights of {str(path)!r}: it is shorter than 8 bytes")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n > size - 8:
            raise CheckpointError(f"cannot load the weights of {str(path)!r}: truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot load the weights of {str(path)!r}: malformed safetensors header ({exc})") from None
    metadata = header.pop("__metadata__", None)
    try:
        tensors = {
            name: TensorEntry(v["dtype"], tuple(v["shape"]), int(v["data_offsets"][0]), int(v["data_offsets"][1]))
            for name, v in header.items()
        }
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"cannot load the weights of {str(path)!r}: its safetensors header is malformed") from None
    need = 8 + n + max((t.end for t in tensors.values()), default=0)
    if need > size:
        raise CheckpointError(
            f"cannot load the weights of {str(path)!r}: the file is truncated ({size} bytes, its header needs {need})"
        )
    return SafetensorsFile(path=path, data_start=8 + n, tensors=tensors, metadata=metadata)


def checkpoint_files(folder: Path) -> list[Path] | None:
    """The safetensors files of a standard checkpoint folder, in index order, or ``None``."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        names = list(dict.fromkeys(weight_map.values()))
        return [folder / n for n in names] if names else None
    single = folder / SINGLE_FILE
    return [single] if single.is_file() else None


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, length: int) -> None:
    src.seek(start)
    buffer = bytearray(min(_CHUNK, max(length, 1)))
    view = memoryview(buffer)
    left = length
    while left:
        n = src.readinto(view[: min(left, len(buffer))])
        if not n:
            raise CheckpointError(f"{getattr(src, 'name', 'a shard')!r} ended early while copying a tensor")
        dst.write(view[:n])
        left -= n


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its output name, its source file and name, and an optional cast."""

    name: str
    source: SafetensorsFile
    source_name: str
    cast: Any | None = None  # a torch dtype, or None to copy the bytes as they are


def _out_entry(t: OutTensor) -> tuple[str, tuple[int, ...], int]:
    entry = t.source.tensors[t.source_name]
    if t.cast is None:
        return entry.dtype, entry.shape, entry.end - entry.begin
    import torch

    code = _SAFETENSORS_DTYPES[str(t.cast).removeprefix("torch.")]
    numel = 1
    for s in entry.shape:
        numel *= s
    return code, entry.shape, numel * torch.empty((), dtype=t.cast).element_size()


def write_safetensors(path: Path, tensors: list[OutTensor]) -> int:
    """Write ``tensors`` into one safetensors file, one tensor at a time.

    The header (names sorted, as ``safetensors`` writes them) is computed from the source
    headers first; then bytes are copied in chunks, or cast one tensor at a time.

    Returns:
        The number of data bytes written.
    """
    ordered = sorted(tensors, key=lambda t: t.name)
    header: dict[str, Any] = {"__metadata__": _METADATA}
    offset = 0
    for t in ordered:
        code, shape, nbytes = _out_entry(t)
        header[t.name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % _HEADER_ALIGN)
    handles: dict[Path, BinaryIO] = {}
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for t in ordered:
                entry = t.source.tensors[t.source_name]
                if t.cast is None:
                    src = handles.get(t.source.path)
                    if src is None:
                        src = handles[t.source.path] = open(t.source.path, "rb")  # noqa: SIM115
                    _copy_range(src, out, t.source.data_start + entry.begin, entry.end - entry.begin)
                else:
                    out.write(_cast_bytes(t))
    finally:
        for handle in handles.values():
            handle.close()
    return offset


def _cast_bytes(t: OutTensor) -> bytes:
    import torch
    from safetensors import safe_open

    with safe_open(str(t.source.path), framework="pt") as f:
        tensor = f.get_tensor(t.source_name)
    return tensor.to(t.cast).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------- planning


@dataclass
class RewritePlan:
    """How to turn a checkpoint's files into the pruned model's.

    Attributes:
        files: The source shards, parsed.
        renames: Source tensor name -> output name, for every kept tensor.
        skeleton: The pruned model on the meta device (its config is the one to write).
        result: The :class:`~depthprune.prune.PruneResult` of pruning the skeleton.
        depthpruned: Whether the output is a ``depthprune_<family>`` checkpoint.
    """

    files: list[SafetensorsFile]
    renames: dict[str, str]
    skeleton: Any
    result: Any
    depthpruned: bool

    def output_bytes(self) -> int:
        """Bytes of the kept tensors as the source stores them (before any cast)."""
        return sum(e.end - e.begin for f in self.files for n, e in f.tensors.items() if n in self.renames)


def meta_skeleton(config: Any, trust_remote_code: bool = False) -> Any:
    """The causal LM of ``config`` built on the meta device: structure only, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).eval()


def checkpoint_state(model: Any) -> dict[str, Any] | None:
    """``model``'s tensors under the names ``save_pretrained`` writes them, or ``None``.

    Transformers renames some tensors between module and file (GPT-NeoX's ``lm_head`` is
    ``embed_out`` on disk) with its checkpoint conversion mapping; this applies the same
    reversal that ``save_pretrained`` does. ``None`` when the reversal does more than rename
    (merging or splitting tensors), which a tensor-by-tensor copy cannot follow.
    """
    state = model.state_dict(keep_vars=True)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion mappings renames nothing
        return state
    try:
        reverted = revert_weight_conversion(model, dict(state))
    except Exception as exc:  # noqa: BLE001 - an internal API; any failure means "load instead"
        logger.info("cannot follow transformers' checkpoint renaming on the meta device: %s", exc)
        return None
    if {id(t) for t in reverted.values()} != {id(t) for t in state.values()}:
        return None
    return reverted


def _by_identity(state: Mapping[str, Any]) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, tensor in state.items():
        names.setdefault(id(tensor), []).append(name)
    return names


def plan_rewrite(
    folder: Path,
    config: Any,
    spec: Any,
    replacements: Mapping[Any, None],
    trust_remote_code: bool = False,
) -> RewritePlan | None:
    """Prune a meta skeleton and map the checkpoint's tensors onto it.

    Args:
        folder: A local model folder with ``model.safetensors`` or a sharded index.
        config: Its config (not modified: the skeleton gets a copy).
        spec: The family spec.
        replacements: Units to remove (original indices), all without an emulator.
        trust_remote_code: Passed to ``from_config``.

    Returns:
        The plan, or ``None`` when the checkpoint does not map one-to-one onto the model's
        parameters and buffers (the caller then loads the model).
    """
    import copy

    from depthprune.prune import prune_
    from depthprune.pruned_classes import to_depthpruned_

    paths = checkpoint_files(folder)
    if paths is None:
        return None
    files = [read_header(p) for p in paths]
    skeleton = meta_skeleton(copy.deepcopy(config), trust_remote_code)
    before = checkpoint_state(skeleton)
    if before is None:
        return None
    source_names = [name for f in files for name in f.tensors]
    if set(source_names) != set(before) and not _only_tied_missing(before, set(before) - set(source_names)):
        logger.info("checkpoint tensor names do not match the model's; pruning in memory instead")
        return None
    if set(source_names) - set(before) or len(set(source_names)) != len(source_names):
        return None
    by_name = {name: entry for f in files for name, entry in f.tensors.items()}
    if any(tuple(before[n].shape) != by_name[n].shape for n in source_names):
        # Weights that do not fit the config: loading refuses them with the details.
        return None
    if len({id(before[n]) for n in source_names}) != len(source_names):
        logger.info("checkpoint holds tied tensors twice; pruning in memory instead")
        return None
    blocks_only = all(u.kind == "block" for u in replacements)
    if blocks_only:
        result = prune_(skeleton, list(replacements), spec)
    else:
        result = to_depthpruned_(skeleton, dict(replacements), spec)
    after_state = checkpoint_state(skeleton)
    if after_state is None:
        return None
    after = _by_identity(after_state)
    renames: dict[str, str] = {}
    for name in source_names:
        new = after.get(id(before[name]), [])
        if not new:
            continue
        if name in new:
            renames[name] = name
        elif len(new) == 1:
            renames[name] = new[0]
        else:
            return None
    return RewritePlan(files=files, renames=renames, skeleton=skeleton, result=result, depthpruned=not blocks_only)


def _only_tied_missing(state: Mapping[str, Any], missing: Iterable[str]) -> bool:
    """Whether every tensor the checkpoint lacks is a tied copy that save_pretrained leaves out."""
    by_id = _by_identity(state)
    return all(len(by_id[id(state[name])]) > 1 for name in missing)


# --------------------------------------------------------------------------- writing


def _shard_names(n: int, variant: str | None) -> list[str]:
    stem = "model" if variant is None else f"model.{variant}"
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_rewritten(plan: RewritePlan, out: Path, dtype: Any | None, variant: str | None) -> list[Path]:
    """Write the pruned checkpoint's shards (and index) into ``out``, one output shard per input shard.

    Args:
        plan: From :func:`plan_rewrite`.
        out: An existing, empty folder.
        dtype: A torch dtype to cast floating-point tensors to, or ``None`` to keep them.
        variant: ``depthprune`` for a depthprune export (``model.depthprune.safetensors``).

    Returns:
        The shard files written.
    """
    groups: list[list[OutTensor]] = []
    for f in plan.files:
        group = []
        for name, entry in f.tensors.items():
            if name not in plan.renames:
                continue
            cast = dtype if dtype is not None and entry.dtype in ("F64", "F32", "F16", "BF16") else None
            if cast is not None and _SAFETENSORS_DTYPES[str(cast).removeprefix("torch.")] == entry.dtype:
                cast = None
            group.append(OutTensor(plan.renames[name], f, name, cast))
        if group:
            groups.append(group)
    names = _shard_names(len(groups), variant)
    weight_map: dict[str, str] = {}
    total = 0
    written = []
    for shard, group in zip(names, groups, strict=True):
        total += write_safetensors(out / shard, group)
        written.append(out / shard)
        weight_map.update({t.name: shard for t in group})
    if len(groups) > 1:
        index_name = INDEX_FILE if variant is None else f"model.safetensors.index.{variant}.json"
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("rewrote %d shard(s): %d tensors, %d bytes", len(written), len(weight_map), total)
    return written
