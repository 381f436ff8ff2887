"""Load a GGUF file (llama.cpp's format) as a plain Hugging Face model, or convert it to one.

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=...)``): it maps the
metadata to a config, dequantizes every tensor and rebuilds the tokenizer. This module
wraps that loader so that depthprune gets what it gets from any other model:

* a config without ``quantization_config``, and a model that is not flagged as quantized
  (so ``save_pretrained`` writes it as plain safetensors), in the requested dtype;
* one clear :class:`~depthprune.errors.ModelLoadError` for a file that cannot be a decoder
  LLM: missing, not GGUF, truncated, split, of an architecture transformers cannot read,
  or not a causal LM.

Before transformers sees the file, :func:`read_gguf_header` walks its header (the
metadata and the tensor table, not the tensor data) and checks that the file is as long
as its tensors need, because transformers' reader turns a truncated file into an
unrelated ``struct`` or ``reshape`` error.

GGUF layout (versions 2 and 3, little-endian): ``b"GGUF"``, uint32 version, uint64
tensor count, uint64 metadata count; the metadata as (string key, uint32 type, value);
one entry per tensor as (string name, uint32 n_dims, n_dims x uint64 dims, uint32 ggml
type, uint64 offset); padding to ``general.alignment`` (default 32); then the tensor data,
each tensor at its offset from there. A string is a uint64 length and UTF-8 bytes; an
array is a uint32 element type, a uint64 count and the elements.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from depthprune._fs import atomic_dir, check_output
from depthprune.errors import InputError, ModelLoadError, first_line

if TYPE_CHECKING:
    from depthprune.loading import LoadedModel

logger = logging.getLogger(__name__)

__all__ = [
    "CONVERT_DTYPES",
    "GGUFHeader",
    "convert_gguf",
    "is_gguf_path",
    "load_gguf",
    "load_gguf_config",
    "read_gguf_header",
]

CONVERT_DTYPES = ("float32", "bfloat16", "float16")
_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 8  # ggml uses 4; a larger count only comes from a corrupt table
# Value type -> struct format, for the scalar GGUF metadata types.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Metadata that the checks below read; every other value is skipped.
_WANTED = ("general.architecture", "general.name", "general.alignment", "split.count")


class _Truncated(Exception):
    """The header runs past the end of the file (internal; becomes a ModelLoadError)."""


@dataclass(frozen=True)
class GGUFHeader:
    """What the header of a GGUF file says, as far as loading needs it.

    Attributes:
        path: The file.
        version: GGUF format version (2 or 3).
        architecture: ``general.architecture`` (llama.cpp's name, e.g. ``"llama"``).
        name: ``general.name``, when present.
        n_tensors: Number of tensors in the file.
        size: Bytes the file has.
        data_end: Bytes the file needs to hold all its tensors.
    """

    path: Path
    version: int
    architecture: str
    name: str | None
    n_tensors: int
    size: int
    data_end: int


def is_gguf_path(name: str | os.PathLike[str]) -> bool:
    """Whether a model reference names a GGUF file: it ends in ``.gguf`` and is not a folder."""
    path = Path(name).expanduser()
    return path.name.lower().endswith(".gguf") and not path.is_dir()


def has_gguf_magic(path: str | os.PathLike[str]) -> bool:
    """Whether a file starts with the GGUF magic bytes (False when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == _MAGIC
    except OSError:
        return False


class _Reader:
    """Sequential little-endian reads from a buffer that raise ``_Truncated`` at its end."""

    def __init__(self, buf: Any, pos: int = 0) -> None:
        self.buf, self.pos, self.end = buf, pos, len(buf)

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > self.end:
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > self.end:
            raise _Truncated
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8")

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[vtype])
        elif vtype == _STRING:
            n = self.take("<Q")
            self.pos += n
        elif vtype == _ARRAY and depth < 4:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[etype])
            else:
                for _ in range(count):
                    self.skip_value(etype, depth + 1)
        else:
            raise ValueError(f"unknown metadata value type {vtype}")
        if self.pos > self.end:
            raise _Truncated

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        self.skip_value(vtype)
        return None


def _tensor_bytes(dims: list[int], ggml_type: int) -> int:
    import gguf

    sizes = gguf.GGML_QUANT_SIZES.get(ggml_type)
    if sizes is None:
        raise ValueError(f"unknown ggml tensor type {ggml_type}; a newer type needs a newer gguf package")
    block, type_size = sizes
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read and check the header of a GGUF file, without reading any tensor data.

    Args:
        path: The ``.gguf`` file.

    Returns:
        The :class:`GGUFHeader`.

    Raises:
        ModelLoadError: the file does not exist, is not a GGUF file, is truncated or
            corrupt, is one part of a split model, or holds no tensors.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist; check the path")
    if not p.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a regular file; expected a .gguf file")
    size = p.stat().st_size
    if size < 4 or not has_gguf_magic(p):
        raise ModelLoadError(
            f"{str(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF'); "
            "pass a llama.cpp .gguf model, or a Hugging Face model folder"
        )
    hint = "download or copy it again"
    with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf, 4)
        try:
            version = r.take("<I")
            if version not in _VERSIONS:
                raise ModelLoadError(
                    f"GGUF file {str(path)!r} has format version {version}; expected version "
                    f"{' or '.join(map(str, _VERSIONS))}; re-export it with a current llama.cpp"
                )
            n_tensors, n_kv = r.take("<Q"), r.take("<Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key, vtype = r.string(), r.take("<I")
                if key in _WANTED:
                    meta[key] = r.value(vtype)
                else:
                    r.skip_value(vtype)
            data_size = 0
            for _ in range(n_tensors):
                r.string()
                n_dims = r.take("<I")
                if n_dims > _MAX_DIMS:
                    raise ValueError(f"a tensor has {n_dims} dimensions")
                dims = [r.take("<Q") for _ in range(n_dims)]
                ggml_type, offset = r.take("<I"), r.take("<Q")
                data_size = max(data_size, offset + _tensor_bytes(dims, ggml_type))
        except _Truncated:
            raise ModelLoadError(f"GGUF file {str(path)!r} ends inside its header ({size} bytes), so it is truncated or corrupt; {hint}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"GGUF file {str(path)!r} has a corrupt header ({first_line(exc)}); {hint}") from exc
        header_end = r.pos
    alignment = meta.get("general.alignment") or _DEFAULT_ALIGNMENT
    data_end = -(-header_end // alignment) * alignment + data_size
    if size < data_end:
        raise ModelLoadError(
            f"GGUF file {str(path)!r} is truncated: its tensors need {data_end} bytes but the file has {size}; {hint}"
        )
    if (meta.get("split.count") or 1) > 1:
        raise ModelLoadError(
            f"GGUF file {str(path)!r} is one part of a model split into {meta['split.count']} files; "
            "merge them first with `llama-gguf-split --merge`"
        )
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"GGUF file {str(path)!r} has no general.architecture, so it is corrupt; {hint}")
    if n_tensors == 0:
        raise ModelLoadError(
            f"GGUF file {str(path)!r} holds no tensors (a vocabulary-only file?); pass a GGUF file with model weights"
        )
    name = meta.get("general.name")
    return GGUFHeader(p, version, arch, name if isinstance(name, str) else None, n_tensors, size, data_end)


def _wrap(path: str, architecture: str, what: str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load the {what} of GGUF file {path!r} (architecture {architecture!r}): "
        f"{first_line(exc).rstrip('.')}; depthprune reads GGUF through transformers, which supports the decoder "
        "families it lists in transformers.integrations.ggml (llama, mistral, qwen2, qwen3, phi3, gemma2, ...)"
    )


@functools.lru_cache(maxsize=4)
def _config_for(path: str, architecture: str, size: int, mtime_ns: int) -> Any:
    """Parse a GGUF file's config, once per file version: transformers re-reads all metadata."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    file = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise _wrap(path, architecture, "config", exc) from exc
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(
            f"GGUF file {path!r} holds a {architecture!r} model ({type(config).__name__}), which is not a "
            "causal (decoder-only) language model; depthprune prunes decoder LLMs such as Llama or Qwen"
        )
    # transformers' GGUF config names no class; the family lookup matches on it first.
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if not getattr(config, "architectures", None) and isinstance(model_class, type):
        config.architectures = [model_class.__name__]
    # The quantization lives in the file, not in the config; general.name is no path.
    for key in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    return config


def _read(path: str | os.PathLike[str]) -> tuple[GGUFHeader, Any]:
    """Check a GGUF file and return its header and (a copy of) its config."""
    header = read_gguf_header(path)
    st = header.path.stat()
    config = _config_for(str(header.path.resolve()), header.architecture, st.st_size, st.st_mtime_ns)
    return header, copy.deepcopy(config)


def load_gguf_config(path: str | os.PathLike[str]) -> Any:
    """The Hugging Face config of a GGUF file, without ``quantization_config``.

    Raises:
        ModelLoadError: see :func:`read_gguf_header`; also when transformers cannot read
            the architecture, or the model is not a causal LM.
    """
    return _read(path)[1]


@contextlib.contextmanager
def _dequantize_bar_follows_transformers() -> Iterator[None]:
    """Make the bar of transformers' GGUF dequantization obey its progress-bar switch.

    That loader draws a raw tqdm bar, which ignores
    ``transformers.utils.logging.disable_progress_bar()``, so the CLI could not hide it
    when stderr is not a terminal.
    """
    import importlib

    from transformers.utils import logging as hf_logging

    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        yield
        return
    original = getattr(module, "tqdm", None)
    if original is None or hf_logging.is_progress_bar_enabled():
        yield
        return

    def quiet(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "disable": True})

    module.tqdm = quiet
    try:
        yield
    finally:
        module.tqdm = original


def _load_weights(header: GGUFHeader, config: Any, dtype: str, attn_implementation: str | None) -> nn.Module:
    """Dequantize a GGUF file into a plain (not quantized-flagged) causal LM on the CPU."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from depthprune.loading import DTYPES, check_loading_info, quiet_loading_report

    try:
        import accelerate  # noqa: F401  transformers needs it for GGUF, and says so less clearly
    except ImportError as exc:
        raise ModelLoadError("loading a GGUF file needs the accelerate package; pip install accelerate") from exc
    kwargs: dict[str, Any] = {
        "gguf_file": header.path.name,
        "config": config,
        "dtype": DTYPES[dtype],
        # Unpack every weight into a dense tensor even where transformers could keep GGUF
        # blocks (it can, for some architectures, when the `kernels` package is present):
        # depthprune needs plain tensors to score, prune and save.
        "quantization_config": GgufConfig(dequantize=True),
        "local_files_only": True,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with _dequantize_bar_follows_transformers(), quiet_loading_report():
            model, info = AutoModelForCausalLM.from_pretrained(str(header.path.parent), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, struct.error) as exc:
        raise _wrap(str(header.path), header.architecture, "weights", exc) from exc
    check_loading_info(info, str(header.path))
    # With dequantize=True transformers drops the quantization flag itself; make sure of it,
    # because a flagged model refuses save_pretrained.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def _load_tokenizer(header: GGUFHeader, config: Any) -> Any | None:
    """The tokenizer stored in a GGUF file, or ``None`` (with a warning) when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(header.path.parent), gguf_file=header.path.name, local_files_only=True
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("no tokenizer loaded from %s: %s", header.path, first_line(exc))
        return None
    # GGUF tokenizers carry no length limit; the model's context is the real one.
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and getattr(tokenizer, "model_max_length", 0) > 10**12:
        tokenizer.model_max_length = context
    return tokenizer


def load_gguf(
    path: str | os.PathLike[str],
    dtype: str = "auto",
    device: str = "cpu",
    attn_implementation: str | None = None,
    load_tokenizer: bool = True,
) -> LoadedModel:
    """Load a GGUF file as a plain causal LM, its tokenizer and its family spec.

    The weights are dequantized by transformers into ordinary tensors, so the model is
    the same as one loaded from the converted folder (see :func:`convert_gguf`).

    Args:
        path: The ``.gguf`` file.
        dtype: ``auto`` (float32 for quantized files), ``float32``, ``bfloat16`` or ``float16``.
        device: Where to put the model.
        attn_implementation: Passed to ``from_pretrained`` (e.g. ``"eager"``).
        load_tokenizer: Also load the tokenizer stored in the file.

    Returns:
        A :class:`depthprune.loading.LoadedModel` in eval mode, whose ``source`` is
        ``path`` and whose ``local_dir`` is the folder holding the file (so that no
        output replaces it).

    Raises:
        ModelLoadError: the file cannot be loaded (see :func:`load_gguf_config`), or
            ``dtype`` is unknown.
        UnsupportedArchitectureError: no depthprune family file matches the model.
    """
    from depthprune.architectures import check_model, spec_for_config
    from depthprune.loading import DTYPES, LoadedModel

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    header, config = _read(path)
    spec = spec_for_config(config)
    model = _load_weights(header, config, dtype, attn_implementation)
    model.to(device).eval()
    check_model(model, spec)
    tokenizer = _load_tokenizer(header, config) if load_tokenizer else None
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=str(path), local_dir=header.path.parent)


def convert_gguf(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: str = "float32",
    *,
    force: bool = False,
) -> Path:
    """Convert a GGUF file into a plain Hugging Face safetensors folder.

    The folder holds ``config.json`` (no ``quantization_config``), ``model.safetensors``,
    ``generation_config.json`` and the tokenizer files, and loads with
    ``AutoModelForCausalLM.from_pretrained(out)`` without depthprune or the GGUF file.
    Quantized weights are dequantized, so the folder is larger than the file; tied
    embeddings stay tied. It is written to a temporary sibling and renamed at the end.

    Args:
        path: The ``.gguf`` file.
        out: The folder to create.
        dtype: ``float32``, ``bfloat16`` or ``float16``, the dtype of the saved weights.
        force: Replace ``out`` if it exists.

    Returns:
        The output folder.

    Raises:
        InputError: ``dtype`` is not one of :data:`CONVERT_DTYPES`, ``out`` would replace
            the GGUF file, or the parent of ``out`` is missing.
        OutputExistsError: ``out`` exists and ``force`` is false.
        ModelLoadError: the file cannot be loaded (see :func:`load_gguf_config`).
        UnsupportedArchitectureError: no depthprune family file matches the model.
    """
    from depthprune.architectures import spec_for_config

    if dtype not in CONVERT_DTYPES:
        raise InputError(f"unknown dtype {dtype!r} for convert-gguf; expected one of {', '.join(CONVERT_DTYPES)}")
    out_path = check_output(out, force, "dir", models=[path])
    source = Path(path).expanduser()
    header, config = _read(source)
    spec_for_config(config)
    model = _load_weights(header, config, dtype, None)
    tokenizer = _load_tokenizer(header, config)
    with atomic_dir(out_path, force, models=[path]) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("converted %s (%s, %d tensors) into %s in %s", path, header.architecture, header.n_tensors, out, dtype)
    return out_path
