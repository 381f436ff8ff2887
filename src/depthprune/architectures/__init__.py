"""Model families as data.

Each ``*.json`` file in this folder describes one family of decoder models: where the
list of decoder layers is, which attributes of a layer are the attention and MLP paths
and their norms, which config keys change when blocks are removed, and whether the
residual is parallel. The core code reads these files and holds no family-specific
branches.

Extra files can be supplied without editing the package: every folder listed in the
environment variable ``DEPTHPRUNE_ARCH_PATH`` (``os.pathsep``-separated) is searched too,
and its files take precedence over the built-in ones. See ``docs/architectures.md``.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from depthprune.errors import UnsupportedArchitectureError

_BUILTIN_DIR = Path(__file__).resolve().parent
_ENV_PATH = "DEPTHPRUNE_ARCH_PATH"


@dataclass(frozen=True)
class PathSpec:
    """One residual path of a decoder layer (attention or MLP).

    Attributes:
        module: Attribute of the decoder layer that computes the path's update.
        pre_norms: Attributes of the norms applied to the residual stream before ``module``.
        post_norms: Attributes of the norms applied to ``module``'s output before the
            residual add (Gemma2's sandwich norms).
        cache_arg: Keyword under which the decoder layer passes the KV cache to the
            attention module; ``None`` for an MLP.
    """

    module: str
    pre_norms: tuple[str, ...] = ()
    post_norms: tuple[str, ...] = ()
    cache_arg: str | None = None


@dataclass(frozen=True)
class BiasFlag:
    """A config flag that gives a path's output projection a bias.

    Attributes:
        flag: The config key (Llama's ``attention_bias``, ``mlp_bias``).
        adds: Every projection of the path (relative to the path module) that the flag
            gives a bias, in every layer; all but the folded ones must then be zero.
    """

    flag: str
    adds: tuple[str, ...]


@dataclass(frozen=True)
class FoldProj:
    """The output projection of a path, where emulators of later removed units fold.

    Attributes:
        proj: The projection, relative to the path module (``o_proj``, ``down_proj``); its
            output is the path's update to the stream.
        bias: ``"always"`` when it always has a bias, a :class:`BiasFlag` when a config
            flag gives it one, ``None`` when it cannot have one (a bias cannot fold there).
    """

    proj: str
    bias: str | BiasFlag | None = None


@dataclass(frozen=True)
class FoldSpec:
    """Where a family's stand-ins can fold into stock weights (see :mod:`depthprune.recover.fold`).

    Attributes:
        embeddings: Whether the token embeddings' output is added to the stream as is (no
            scale), so that a stand-in before every kept path may fold into them.
        attn: The attention path's output projection, or ``None``.
        mlp: The MLP path's output projection, or ``None``.
    """

    embeddings: bool = False
    attn: FoldProj | None = None
    mlp: FoldProj | None = None

    def proj(self, kind: str) -> FoldProj | None:
        return self.attn if kind == "attn" else self.mlp if kind == "mlp" else None


@dataclass(frozen=True)
class ArchSpec:
    """What depthprune needs to know about one model family.

    Attributes:
        family: Short family name, e.g. ``"llama"``.
        architectures: ``config.architectures[0]`` values that this file matches.
        model_types: ``config.model_type`` values that this file matches.
        layers: Dotted path from the top-level model to the decoder ``ModuleList``.
        attn: The attention path.
        mlp: The feed-forward path.
        num_layers_key: Config key that holds the number of decoder layers.
        max_positions_key: Config key that holds the longest context the model takes
            (``max_position_embeddings``, GPT-2's ``n_positions``); ``None`` when the
            family's config does not say.
        per_layer_keys: Config keys holding one entry per layer, sliced on removal.
        parallel_residual: ``True``/``False``, or ``(config_key, default)`` when the
            config decides.
        unsupported_config: Config values under which removal would change the math of
            the remaining layers.
        nemotron_nas: Whether the decoder layer is Llama's, so that a pruned model of this
            family can be written as a DeciLM / "nemotron-nas" config (a Llama layer with
            per-layer no-op sections) or as a llama / deci GGUF file.
        fold: Where stand-ins fold into stock weights; ``None`` when nowhere.
        source: The file the spec was read from.
    """

    family: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layers: str
    attn: PathSpec
    mlp: PathSpec
    num_layers_key: str
    max_positions_key: str | None = None
    per_layer_keys: tuple[str, ...] = ()
    parallel_residual: bool | tuple[str, bool] = False
    unsupported_config: dict[str, Any] = field(default_factory=dict)
    nemotron_nas: bool = False
    fold: FoldSpec | None = None
    source: str = ""

    def num_layers(self, config: Any) -> int:
        """The number of decoder layers that ``config`` declares."""
        return int(getattr(config, self.num_layers_key))

    def max_positions(self, config: Any) -> int | None:
        """The longest context ``config`` allows, or ``None`` if it does not say."""
        value = getattr(config, self.max_positions_key, None) if self.max_positions_key else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def is_parallel(self, config: Any) -> bool:
        """Whether attention and MLP both read the block input (parallel residual)."""
        if isinstance(self.parallel_residual, bool):
            return self.parallel_residual
        key, default = self.parallel_residual
        return bool(getattr(config, key, default))

    def path(self, kind: str) -> PathSpec:
        """The :class:`PathSpec` of ``kind`` (``"attn"`` or ``"mlp"``)."""
        if kind == "attn":
            return self.attn
        if kind == "mlp":
            return self.mlp
        raise ValueError(f"unknown sublayer kind {kind!r}; expected 'attn' or 'mlp'")


_REQUIRED = ("family", "architectures", "model_types", "layers", "attn", "mlp", "config")
_KNOWN = (*_REQUIRED, "parallel_residual", "unsupported_config", "nemotron_nas", "fold", "notes")
_CONFIG_KEYS = ("num_layers", "max_positions", "per_layer")


def _parse_path(data: dict[str, Any], where: str) -> PathSpec:
    unknown = set(data) - {"module", "pre_norms", "post_norms", "cache_arg"}
    if unknown or "module" not in data:
        raise UnsupportedArchitectureError(
            f"{where}: a path needs 'module' and may have 'pre_norms', 'post_norms', 'cache_arg'; "
            f"got keys {sorted(data)}"
        )
    return PathSpec(
        module=data["module"],
        pre_norms=tuple(data.get("pre_norms", ())),
        post_norms=tuple(data.get("post_norms", ())),
        cache_arg=data.get("cache_arg"),
    )


def _parse_fold_proj(data: Any, where: str) -> FoldProj | None:
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - {"proj", "bias"} or not isinstance(data.get("proj"), str):
        raise UnsupportedArchitectureError(f"{where}: expected {{'proj': NAME, 'bias': ...}} or null; got {data!r}")
    bias = data.get("bias")
    if isinstance(bias, dict):
        if set(bias) != {"flag", "adds"} or not isinstance(bias["flag"], str) or not isinstance(bias["adds"], list):
            raise UnsupportedArchitectureError(f"{where}: bias must be {{'flag': KEY, 'adds': [NAMES]}}; got {bias!r}")
        bias = BiasFlag(bias["flag"], tuple(bias["adds"]))
    elif bias not in (None, "always"):
        raise UnsupportedArchitectureError(f"{where}: bias is {bias!r}; expected 'always', {{'flag', 'adds'}} or null")
    return FoldProj(data["proj"], bias)


def _parse_fold(data: Any, attn: PathSpec, mlp: PathSpec, source: str) -> FoldSpec | None:
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - {"embeddings", "attn", "mlp"}:
        raise UnsupportedArchitectureError(f"architecture file {source}: fold may have keys embeddings, attn, mlp; got {data!r}")
    spec = FoldSpec(
        embeddings=bool(data.get("embeddings", False)),
        attn=_parse_fold_proj(data.get("attn"), f"architecture file {source}: fold.attn"),
        mlp=_parse_fold_proj(data.get("mlp"), f"architecture file {source}: fold.mlp"),
    )
    for kind, path in (("attn", attn), ("mlp", mlp)):
        if spec.proj(kind) is not None and path.post_norms:
            raise UnsupportedArchitectureError(
                f"architecture file {source}: fold.{kind} names a projection, but the path's update is its "
                f"post-norm's output, which nothing folds into; set fold.{kind} to null"
            )
    return spec


def parse_spec(data: dict[str, Any], source: str = "<dict>") -> ArchSpec:
    """Build an :class:`ArchSpec` from the JSON form, rejecting unknown or missing keys."""
    missing = [k for k in _REQUIRED if k not in data]
    unknown = [k for k in data if k not in _KNOWN]
    if missing or unknown:
        raise UnsupportedArchitectureError(
            f"architecture file {source}: missing keys {missing}, unknown keys {unknown}; "
            f"expected keys {list(_KNOWN)}"
        )
    parallel = data.get("parallel_residual", False)
    if isinstance(parallel, dict):
        parallel = (parallel["config_key"], bool(parallel.get("default", False)))
    cfg = data["config"]
    if not isinstance(cfg, dict) or "num_layers" not in cfg:
        raise UnsupportedArchitectureError(f"architecture file {source}: config.num_layers is required")
    unknown = [k for k in cfg if k not in _CONFIG_KEYS]
    if unknown:
        raise UnsupportedArchitectureError(
            f"architecture file {source}: unknown config keys {unknown}; expected keys {list(_CONFIG_KEYS)}"
        )
    nemotron_nas = data.get("nemotron_nas", False)
    if not isinstance(nemotron_nas, bool):
        raise UnsupportedArchitectureError(f"architecture file {source}: nemotron_nas is {nemotron_nas!r}; expected true or false")
    attn = _parse_path(data["attn"], f"{source}: attn")
    if attn.cache_arg is None:
        raise UnsupportedArchitectureError(f"architecture file {source}: attn.cache_arg is required")
    mlp = _parse_path(data["mlp"], f"{source}: mlp")
    return ArchSpec(
        family=data["family"],
        architectures=tuple(data["architectures"]),
        model_types=tuple(data["model_types"]),
        layers=data["layers"],
        attn=attn,
        mlp=mlp,
        num_layers_key=cfg["num_layers"],
        max_positions_key=cfg.get("max_positions"),
        per_layer_keys=tuple(cfg.get("per_layer", ())),
        parallel_residual=parallel,
        unsupported_config=dict(data.get("unsupported_config", {})),
        nemotron_nas=nemotron_nas,
        fold=_parse_fold(data.get("fold"), attn, mlp, source),
        source=source,
    )


def _search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(_ENV_PATH, "").split(os.pathsep) if p]
    return [*extra, _BUILTIN_DIR]


@functools.lru_cache(maxsize=8)
def _load_specs(dirs: tuple[Path, ...]) -> tuple[ArchSpec, ...]:
    specs: dict[str, ArchSpec] = {}
    for folder in dirs:
        for file in sorted(folder.glob("*.json")):
            spec = parse_spec(json.loads(file.read_text(encoding="utf-8")), str(file))
            specs.setdefault(spec.family, spec)  # earlier folders win
    return tuple(specs.values())


def all_specs() -> tuple[ArchSpec, ...]:
    """Every known family: the files in ``DEPTHPRUNE_ARCH_PATH`` first, then the built-in ones."""
    return _load_specs(tuple(_search_dirs()))


def supported_families() -> list[str]:
    """Sorted names of the supported families."""
    return sorted(s.family for s in all_specs())


def match_spec(config: Any) -> ArchSpec | None:
    """The family of a Hugging Face config, or ``None`` when no file matches.

    A depthprune export is matched on the family it records; any other config on
    ``config.architectures[0]`` first, then ``config.model_type``.
    """
    specs = all_specs()
    info = getattr(config, "depthprune", None)
    if isinstance(info, dict):  # a depthprune export names the family it was made from
        for spec in specs:
            if spec.family == info.get("family"):
                return spec
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        for spec in specs:
            if archs[0] in spec.architectures:
                return spec
    model_type = getattr(config, "model_type", None)
    for spec in specs:
        if model_type in spec.model_types:
            return spec
    return None


def spec_for_config(config: Any) -> ArchSpec:
    """Find the family of a Hugging Face config (see :func:`match_spec`).

    Raises:
        UnsupportedArchitectureError: nothing matches; the message names the supported
            families and says how to add one.
    """
    spec = match_spec(config)
    if spec is not None:
        return spec
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    shown = archs[0] if archs else "<none>"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {shown!r} (model_type {model_type!r}); supported families: "
        f"{', '.join(supported_families())}. To add one, write a JSON file like "
        f"{_BUILTIN_DIR / 'llama.json'} and put its folder in ${_ENV_PATH} (see docs/architectures.md)"
    )


def num_layers(config: Any) -> int:
    """The number of decoder layers a config declares, read through its family's key.

    Raises:
        UnsupportedArchitectureError: the config matches no family.
    """
    return spec_for_config(config).num_layers(config)


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    """Return ``root``'s submodule at the dotted path, with a clear error when absent."""
    try:
        return root.get_submodule(dotted)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"{type(root).__name__} has no submodule {dotted!r}; the architecture file does not fit this model"
        ) from exc


def check_model(model: nn.Module, spec: ArchSpec) -> None:
    """Check that a model has every module that ``spec`` names and no config the spec refuses.

    Raises:
        UnsupportedArchitectureError: a path is missing or a refused config value is set.
    """
    for key, bad in spec.unsupported_config.items():
        if getattr(model.config, key, None) == bad:
            raise UnsupportedArchitectureError(
                f"{spec.family} models with {key}={bad!r} are not supported: removing layers would change "
                f"the remaining ones ({spec.source})"
            )
    layers = get_submodule(model, spec.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(
            f"{spec.layers!r} of {type(model).__name__} is not a non-empty ModuleList ({spec.source})"
        )
    for path in (spec.attn, spec.mlp):
        for name in (path.module, *path.pre_norms, *path.post_norms):
            get_submodule(layers[0], name)
