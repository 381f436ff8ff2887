"""Writing pruned models as Hugging Face folders with safetensors weights."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from torch import nn

from depthprune import __version__
from depthprune._fs import atomic_dir
from depthprune.errors import InputError, check_choice

logger = logging.getLogger(__name__)

MANIFEST = "depthprune.json"
ExportFormat = Literal["hf", "nemotron-nas"]
EXPORT_FORMATS: tuple[str, ...] = ("hf", "nemotron-nas")
NEMOTRON_NAS_FAMILIES: tuple[str, ...] = ("llama", "mistral")


_NEEDS_DEPTHPRUNE = """\
---
library_name: transformers
tags: [depthprune]
---
# A depthprune export ({family})

Some attention or MLP sublayers of this model were removed or replaced by small emulation
modules, which no standard transformers architecture can express. It loads only with
depthprune installed:

```python
import depthprune
model = depthprune.load("path/to/this/folder")
# or, after `import depthprune`: AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

The weights are in `model.depthprune.safetensors`, so the unpruned family class cannot
pick them up by mistake. `depthprune.json` lists what was removed.
"""


def export(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    manifest: dict[str, Any] | None = None,
    force: bool = False,
    source_dir: Path | None = None,
    export_format: ExportFormat = "hf",
) -> Path:
    """Write ``model`` (and its tokenizer) to ``out`` atomically.

    The folder is built in a temporary sibling and renamed at the end, so a failure leaves
    nothing half-written and an existing ``out`` untouched.

    With ``export_format="hf"`` the model is saved with ``save_pretrained``: a standard
    checkpoint for a block-pruned model, or a ``depthprune_<family>`` checkpoint for a
    model made by :func:`depthprune.pruned_classes.to_depthpruned_` (loadable with
    ``depthprune.load`` or, after ``import depthprune``, ``AutoModelForCausalLM``).

    With ``export_format="nemotron-nas"`` (Llama and Mistral families, no emulators) the
    config is written in the DeciLM / "nemotron-nas" layout that vLLM's
    ``DeciLMForCausalLM`` serves: ``block_configs`` with ``no_op`` attention and FFN
    entries (see :func:`nemotron_nas_config`).

    Args:
        model: The model to save; weights are written as safetensors.
        out: The output folder.
        tokenizer: Saved beside the model when given.
        manifest: Extra content of ``depthprune.json`` (source, removed units, index map...).
        force: Replace an existing ``out``.
        source_dir: The local folder the model was loaded from; refused as ``out``.
        export_format: ``hf`` or ``nemotron-nas``.

    Returns:
        The output folder.

    Raises:
        InputError: ``out`` is the source folder, or the model cannot be written in
            ``export_format``.
    """
    out_path = Path(out)
    if source_dir is not None and out_path.resolve() == Path(source_dir).resolve():
        raise InputError(f"refusing to write into the source model folder {str(source_dir)!r}; choose another -o")
    check_choice(export_format, EXPORT_FORMATS, "export format")
    nas_config = nemotron_nas_config(model) if export_format == "nemotron-nas" else None
    from depthprune.pruned_classes import WEIGHTS_VARIANT, is_depthpruned

    depthpruned = is_depthpruned(model) and export_format == "hf"
    with atomic_dir(out_path, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, variant=WEIGHTS_VARIANT if depthpruned else None)
        if depthpruned:
            (tmp / "README.md").write_text(_NEEDS_DEPTHPRUNE.format(family=getattr(model.config, "model_type", "")), encoding="utf-8")
        if nas_config is not None:
            (tmp / "config.json").write_text(json.dumps(nas_config, indent=2) + "\n", encoding="utf-8")
            (tmp / "configuration_decilm.py").write_text(_DECILM_CONFIG_PY, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        body = {
            "depthprune_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "format": export_format,
            **(manifest or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", out_path)
    return out_path


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the ``depthprune.json`` of an exported folder, or ``None`` if it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- nemotron-nas


def _ffn_mult_for(intermediate: int, hidden: int) -> float | None:
    """The DeciLM ``ffn_mult`` that reproduces ``intermediate`` exactly, or ``None``.

    DeciLM computes ``intermediate = round_up(int(2 * ffn_mult * hidden / 3), 256)``.
    """
    mult = 3 * intermediate / (2 * hidden)
    size = int(2 * mult * hidden / 3)
    size = size if size % 256 == 0 else size + 256 - size % 256
    return mult if size == intermediate else None


def nemotron_nas_config(model: nn.Module) -> dict[str, Any]:
    """The DeciLM / "nemotron-nas" ``config.json`` of a Llama-family model with removed sublayers.

    Each layer gets a ``block_configs`` entry::

        {"attention": {"no_op": false, "replace_with_linear": false, "n_heads_in_group": 4},
         "ffn": {"no_op": false, "replace_with_linear": false, "ffn_mult": 2.6667,
                 "intermediate_size": 2816}}

    A removed attention or MLP has ``"no_op": true``. ``ffn_mult`` is written when it
    reproduces the intermediate size exactly under DeciLM's rounding to a multiple of 256;
    ``intermediate_size`` is always written (vLLM reads it when ``ffn_mult`` is absent).
    The format has no way to express an emulator (``replace_with_linear`` is a full
    ``D x D`` linear map without a bias, which no engine we target fills from our modules),
    so models with emulators are refused.

    The config names ``configuration_decilm.DeciLMConfig`` in ``auto_map``; export writes
    that small file beside it, so vLLM (with ``--trust-remote-code``, as for NVIDIA's own
    nemotron-nas checkpoints) can read ``block_configs`` as attributes.

    Raises:
        InputError: the family is not Llama or Mistral, a sliding window is set, or the
            model has emulators.
    """
    from depthprune.pruned_classes import depthprune_info, is_depthpruned, spec_of

    spec = spec_of(model)
    config = model.config
    if spec.family not in NEMOTRON_NAS_FAMILIES:
        raise InputError(
            f"the nemotron-nas format is for the {', '.join(NEMOTRON_NAS_FAMILIES)} families; this model is "
            f"{spec.family!r}; use --format hf"
        )
    if getattr(config, "sliding_window", None) is not None:
        raise InputError(
            f"this model uses sliding-window attention (sliding_window={config.sliding_window}), which the "
            "nemotron-nas format cannot express; use --format hf"
        )
    n_layers = int(getattr(config, spec.num_layers_key))
    no_op: dict[int, set[str]] = {i: set() for i in range(n_layers)}
    if is_depthpruned(model):
        emulated = []
        for entry in depthprune_info(config)["units"]:
            if entry["replace"] != "none":
                emulated.append(f"{entry['unit']} -> {entry['replace']}")
            kind = entry["unit"].split(".")[0]
            no_op[int(entry["layer"])].update(("attn", "mlp") if kind == "block" else (kind,))
        if emulated:
            raise InputError(
                f"the nemotron-nas format supports no_op only and cannot express emulators ({', '.join(emulated)}); "
                "use --format hf, or --recover none"
            )
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden, intermediate = int(config.hidden_size), int(config.intermediate_size)
    mult = _ffn_mult_for(intermediate, hidden)
    blocks = []
    for i in range(n_layers):
        attn_gone, mlp_gone = "attn" in no_op[i], "mlp" in no_op[i]
        ffn: dict[str, Any] = {"no_op": mlp_gone, "replace_with_linear": False}
        if not mlp_gone:
            if mult is not None:
                ffn["ffn_mult"] = mult
            ffn["intermediate_size"] = intermediate
        blocks.append(
            {
                "attention": {
                    "no_op": attn_gone,
                    "replace_with_linear": False,
                    "n_heads_in_group": None if attn_gone else heads // kv_heads,
                },
                "ffn": ffn,
            }
        )
    body = {k: v for k, v in config.to_dict().items() if k not in ("depthprune", "intermediate_size", "num_key_value_heads")}
    rope = body.get("rope_parameters") or {}
    if "rope_theta" in rope:
        body.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            body.setdefault("rope_scaling", rope)
    body.update(
        model_type="nemotron-nas",
        architectures=["DeciLMForCausalLM"],
        auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
        num_hidden_layers=n_layers,
        block_configs=blocks,
    )
    return body


_DECILM_CONFIG_PY = '''"""DeciLM ("nemotron-nas") config, written by depthprune.

A Llama config with one ``block_configs`` entry per layer, whose ``attention`` and ``ffn``
sections read as attributes (``config.block_configs[3].attention.no_op``), as vLLM's
``DeciLMForCausalLM`` expects.
"""

from transformers import LlamaConfig


class _Section(dict):
    """A dict whose keys also read as attributes; missing keys raise ``AttributeError``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class BlockConfig(_Section):
    """One layer: ``attention`` and ``ffn`` sections."""

    def __init__(self, data):
        super().__init__({k: _Section(v) if isinstance(v, dict) else v for k, v in dict(data).items()})


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [BlockConfig(b) for b in (block_configs or [])]
'''
