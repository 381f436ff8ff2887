"""The DeciLM / "nemotron-nas" export format, which vLLM, SGLang and TensorRT-LLM serve.

A sublayer-pruned model of a family whose architecture file sets ``"nemotron_nas": true``
(a Llama-layout decoder layer) is written as a Llama config with one ``block_configs``
entry per layer, where a removed attention or MLP is ``"no_op": true``. The weights are
the pruned model's own; :func:`depthprune.export.export` writes them and calls
:func:`write_nemotron_nas` for the config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from depthprune.architectures import ArchSpec, all_specs
from depthprune.errors import InputError
from depthprune.units import Unit

_FIRST_ATTN = (
    "the nemotron-nas format cannot remove the attention of the first kept layer ({unit}): vLLM's DeciLM layer "
    "then calls its first RMSNorm without a residual and fails; use --format gguf (llama.cpp) or --format hf "
    "(depthprune), or keep that attention"
)


def _ffn_mult_for(intermediate: int, hidden: int) -> float | None:
    """The DeciLM ``ffn_mult`` that reproduces ``intermediate`` exactly, or ``None``.

    vLLM, SGLang, TensorRT-LLM and llama.cpp's converter all compute (each in its own
    ``_ffn_mult_to_intermediate_size``) ``intermediate = int(2 * ffn_mult * hidden / 3)``
    rounded up to a multiple of 256; this applies the same rule to the multiplier written.
    """
    mult = 3 * intermediate / (2 * hidden)
    size = int(2 * mult * hidden / 3)
    size = size if size % 256 == 0 else size + 256 - size % 256
    return mult if size == intermediate else None


def nemotron_nas_families() -> list[str]:
    """The families whose architecture file sets ``"nemotron_nas": true``, sorted."""
    return sorted(s.family for s in all_specs() if s.nemotron_nas)


def check_family(spec: ArchSpec) -> None:
    """Refuse a family that the nemotron-nas format cannot express.

    Raises:
        InputError: ``spec`` does not set ``nemotron_nas``.
    """
    if not spec.nemotron_nas:
        raise InputError(
            f"the nemotron-nas format is for the {', '.join(nemotron_nas_families())} families; this model is "
            f"{spec.family!r}; use --format hf"
        )


def refuse_emulators(emulated: list[str]) -> None:
    """Refuse emulated units, which the format cannot express.

    Args:
        emulated: ``"unit -> replacement"`` descriptions of the emulated units.

    Raises:
        InputError: ``emulated`` is not empty.
    """
    if emulated:
        raise InputError(
            f"the nemotron-nas format cannot express emulators ({', '.join(emulated)}): its replace_with_linear is a "
            "bias-free map of the normed layer input, while these are fitted on the residual stream; use --format hf, "
            "or --recover none"
        )


def check_nemotron_nas_plan(table: Mapping[Unit, str]) -> None:
    """Refuse a plan whose first kept layer loses its attention, before loading weights.

    Whole blocks without an emulator are deleted, so the first kept layer is the first
    index that is not such a block.

    Args:
        table: Unit (original indices) -> replacement (``none``, ``bias``, ``lowrank:R``).

    Raises:
        InputError: the first kept layer's attention is removed.
    """
    dropped = {u.index for u, r in table.items() if u.kind == "block" and r == "none"}
    first = next(i for i in range(max(dropped, default=-1) + 2) if i not in dropped)
    if Unit("attn", first) in table:
        raise InputError(_FIRST_ATTN.format(unit=f"attn.{first}"))


def nemotron_nas_config(model: nn.Module) -> dict[str, Any]:
    """The DeciLM / "nemotron-nas" ``config.json`` of a Llama-layout model with removed sublayers.

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
        InputError: the family's architecture file does not allow nemotron-nas, a sliding
            window is set, the model has emulators, layer 0 has no attention, or no
            ``ffn_mult`` reproduces the intermediate size under the engines' rounding.
    """
    from depthprune.pruned_classes import depthprune_info, is_depthpruned, spec_of

    spec = spec_of(model)
    config = model.config
    check_family(spec)
    if getattr(config, "sliding_window", None) is not None:
        raise InputError(
            f"this model uses sliding-window attention (sliding_window={config.sliding_window}), which the "
            "nemotron-nas format cannot express; use --format hf"
        )
    n_layers = spec.num_layers(config)
    no_op: dict[int, set[str]] = {i: set() for i in range(n_layers)}
    if is_depthpruned(model):
        emulated = []
        for entry in depthprune_info(config)["units"]:
            if entry["replace"] != "none":
                emulated.append(f"{entry['unit']} -> {entry['replace']}")
            kind = entry["unit"].split(".")[0]
            no_op[int(entry["layer"])].update(("attn", "mlp") if kind == "block" else (kind,))
        refuse_emulators(emulated)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden, intermediate = int(config.hidden_size), int(config.intermediate_size)
    mult = _ffn_mult_for(intermediate, hidden)
    if mult is None and not all("mlp" in no_op[i] for i in range(n_layers)):
        raise InputError(
            f"intermediate_size {intermediate} is not int(2 * ffn_mult * {hidden} / 3) rounded up to a multiple of "
            "256 for any ffn_mult, which is how vLLM, SGLang and TensorRT-LLM size DeciLM MLPs; use --format gguf "
            "or --format hf"
        )
    if "attn" in no_op[0]:
        raise InputError(_FIRST_ATTN.format(unit="the attention of layer 0"))
    blocks = []
    for i in range(n_layers):
        attn_gone, mlp_gone = "attn" in no_op[i], "mlp" in no_op[i]
        ffn: dict[str, Any] = {"no_op": mlp_gone, "replace_with_linear": False}
        if not mlp_gone:
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


def write_nemotron_nas(folder: Path, config: dict[str, Any]) -> None:
    """Write ``config`` as ``folder/config.json``, with the ``configuration_decilm.py`` it names."""
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "configuration_decilm.py").write_text(_DECILM_CONFIG_PY, encoding="utf-8")


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
