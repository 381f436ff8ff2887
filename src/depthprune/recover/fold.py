"""Folding emulators into stock weights, so that a recovered model is a standard checkpoint.

A removed unit's stand-in adds its update to the residual stream where the unit was. Two
kinds of stand-in can instead be added earlier, inside the last kept writer of the stream
before the unit (:meth:`depthprune.stream.ResidualStream.writer_before`: the output
projection of a kept attention or MLP path, or the token embeddings), with the same result:

- a bias emulator ``dh = b`` is a constant: ``b`` joins the writer's output bias;
- a linear emulator ``dh = y M`` (``M = A B``) is a linear function of that writer's output
  ``y``: the writer's weights become ``W (I + M)`` in row-vector terms (ReplaceMe,
  Shumaylov et al. 2025), and its bias ``c (I + M)``.

Both are exact because nothing reads the stream between the writer and the unit: every
path passed over is removed, and a fold is refused when one of those stand-ins reads the
stream (a low-rank emulator). The stand-ins of a run of removed units add up in the one
writer; linear maps act on the writer's original output, then biases are added.

Family facts come from the ``fold`` entry of the architecture file (:class:`FoldSpec`):
the output projection of each path, whether it has or can be given a bias (a config flag
such as Llama's ``mlp_bias``, which gives every listed projection of every layer a bias,
all zero but the folded ones), and whether the embeddings' output is the stream as is.
Folding into the embeddings is refused when they are tied to the LM head.

A fold that is not exact is refused with a reason, and the stand-in stays a module.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from depthprune.architectures import ArchSpec, BiasFlag, FoldProj, get_submodule
from depthprune.recover.emulators import BiasEmulator, LinearEmulator, describe
from depthprune.stream import Writer
from depthprune.units import ModelLayout, Unit, removed_paths

logger = logging.getLogger(__name__)

_FOLDABLE = (BiasEmulator, LinearEmulator)


@dataclass(frozen=True)
class FoldResult:
    """What :func:`fold_` did.

    Attributes:
        folded: Unit -> the writer its stand-in was folded into (``mlp.3``, ``embeddings``).
        refused: Unit -> why its stand-in stays a module.
        flags: Config flags that were turned on to give projections a bias.
    """

    folded: dict[Unit, str] = field(default_factory=dict)
    refused: dict[Unit, str] = field(default_factory=dict)
    flags: tuple[str, ...] = ()


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return None
    return Conv1D


def _is_tied(model: nn.Module) -> bool:
    """Whether the LM head shares the input embeddings, now or once the saved model is loaded."""
    out = model.get_output_embeddings()
    shared = out is not None and out.weight is model.get_input_embeddings().weight
    return shared or bool(getattr(model.config, "tie_word_embeddings", False))


def _target_module(layout: ModelLayout, writer: Writer) -> nn.Module:
    if writer.is_embeddings:
        return layout.model.get_input_embeddings()
    proj = layout.spec.fold.proj(writer.kind)  # type: ignore[union-attr]
    path = layout.spec.path(writer.kind)
    return get_submodule(layout.layers[writer.layer], f"{path.module}.{proj.proj}")  # type: ignore[union-attr]


def _writer_refusal(layout: ModelLayout, writer: Writer, unit: Unit, emulator: nn.Module) -> str | None:
    """Why ``emulator`` of ``unit`` cannot fold into ``writer``, or ``None`` when it can."""
    spec, family = layout.spec, layout.spec.family
    if spec.fold is None:
        return f"the {family} architecture file declares no fold targets (fold is null), so stand-ins stay modules"
    if writer.is_embeddings:
        if not spec.fold.embeddings:
            return f"no kept path precedes {unit}, and the {family} embeddings are not added to the stream as they are"
        if _is_tied(layout.model):
            return (
                f"no kept path precedes {unit}, and the token embeddings are tied to the LM head, so changing them "
                "would change the output layer too"
            )
        return None
    proj: FoldProj | None = spec.fold.proj(writer.kind)
    if proj is None:
        return f"the {family} architecture file names no output projection of the {writer.kind} path to fold into"
    module = _target_module(layout, writer)
    kinds = tuple(t for t in (nn.Linear, _conv1d_type()) if t is not None)
    if not isinstance(module, kinds):
        return f"{writer}'s {proj.proj} is a {type(module).__name__}, not a linear layer"
    if isinstance(emulator, BiasEmulator) and module.bias is None and not isinstance(proj.bias, BiasFlag):
        return (
            f"{family}'s {writer.kind} output projection ({proj.proj}) cannot carry a bias (its architecture file "
            "has no bias flag for it); use linear:R, or --no-fold"
        )
    return None


def plan_folds(
    model: nn.Module, replacements: Mapping[Unit, nn.Module | None], spec: ArchSpec | None = None
) -> tuple[dict[Unit, Writer], dict[Unit, str]]:
    """Where each stand-in of ``replacements`` would fold, and why others cannot; changes nothing.

    Every unit of ``replacements`` counts as removed. A writer into which a linear
    emulator cannot fold takes no other stand-in either, since that emulator, left as a
    module, reads the writer's output, which a fold would change.

    Returns:
        ``(targets, refused)``: unit -> writer for the stand-ins that fold, unit -> reason
        for every other unit with a stand-in.
    """
    layout = ModelLayout.of(model, spec)
    gone = removed_paths(replacements)
    owner = {(s.index, s.kind): u for u in replacements for s in u.sublayers()}
    targets: dict[Unit, Writer] = {}
    refused: dict[Unit, str] = {}
    for unit, emulator in sorted(replacements.items()):
        if emulator is None:
            continue
        if not isinstance(emulator, _FOLDABLE):
            refused[unit] = f"{describe(emulator)} is a function of the stream entering the unit; only bias and linear:R fold"
            continue
        writer, passed = layout.stream.writer_before(unit.kind, unit.index, gone)
        readers = sorted({owner[p] for p in passed} - {unit})
        readers = [v for v in readers if replacements[v] is not None and not isinstance(replacements[v], _FOLDABLE)]
        if readers:
            v = readers[0]
            refused[unit] = f"{v}'s {describe(replacements[v])} emulator reads the stream between {writer} and {unit}, which the fold would change"
            continue
        reason = _writer_refusal(layout, writer, unit, emulator)
        if reason is not None:
            refused[unit] = reason
        else:
            targets[unit] = writer
    for unit, reason in list(refused.items()):
        if not isinstance(replacements[unit], LinearEmulator):
            continue  # other stand-ins left as modules do not read the writer's output
        writer, _ = layout.stream.writer_before(unit.kind, unit.index, gone)
        for other in [u for u, w in targets.items() if w == writer]:
            del targets[other]
            refused[other] = f"it would fold into {writer} together with {unit}, which cannot fold there ({reason})"
    return targets, refused


def _enable_bias(layout: ModelLayout, kind: str, flag: BiasFlag) -> None:
    """Turn on ``flag`` in the config and give every projection it names a zero bias."""
    path = layout.spec.path(kind)
    for layer in layout.layers:
        owner = get_submodule(layer, path.module)
        for name in flag.adds:
            module = owner.get_submodule(name) if hasattr(owner, name) else None
            if isinstance(module, nn.Linear) and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device))
    setattr(layout.model.config, flag.flag, True)


@torch.no_grad()
def _apply(layout: ModelLayout, writer: Writer, matrix: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """``y -> y (I + matrix) + bias`` for the output ``y`` of ``writer``, in its weights (float64 math)."""
    module = _target_module(layout, writer)
    weight = module.weight
    w = weight.double()
    if writer.is_embeddings:  # (V, D): row v is the output for token v
        if matrix is not None:
            w = w + w @ matrix
        if bias is not None:
            w = w + bias
        weight.copy_(w.to(weight.dtype))
        return
    conv = _conv1d_type()
    if matrix is not None:
        # nn.Linear: y = x W^T + c, so W^T -> W^T (I + M); Conv1D: y = x W + c, so W -> W (I + M).
        w = w + w @ matrix if conv is not None and isinstance(module, conv) else w + matrix.T @ w
        weight.copy_(w.to(weight.dtype))
    if module.bias is not None:
        c = module.bias.double()  # (D,)
        if matrix is not None:
            c = c + c @ matrix
        if bias is not None:
            c = c + bias
        module.bias.copy_(c.to(module.bias.dtype))
    elif bias is not None:
        raise RuntimeError(f"{writer} has no bias to fold into; its bias flag was not turned on")


def fold_(
    model: nn.Module, replacements: Mapping[Unit, nn.Module | None], spec: ArchSpec | None = None
) -> tuple[dict[Unit, nn.Module | None], FoldResult]:
    """Fold every stand-in that folds exactly into the weights of ``model``, in place.

    ``model`` must still hold every path (call this before removing or installing anything).
    After it, installing the returned replacements (folded units now ``None``: plain
    removal) computes what installing ``replacements`` computed on the unfolded model.

    Args:
        model: A causal LM of a supported family, with no unit removed yet.
        replacements: Unit -> stand-in (``None`` for plain removal); every unit is removed.
        spec: The family spec; looked up from ``model.config`` when omitted.

    Returns:
        ``(remaining, result)``: the replacements still to install, and what was folded
        where, what was refused and why, and which config flags were turned on.
    """
    layout = ModelLayout.of(model, spec)
    targets, refused = plan_folds(model, replacements, layout.spec)
    groups: dict[Writer, list[Unit]] = {}
    for unit, writer in targets.items():
        groups.setdefault(writer, []).append(unit)
    flags: list[str] = []
    for writer, units in sorted(groups.items()):
        biases = [replacements[u].bias.detach().double() for u in units if isinstance(replacements[u], BiasEmulator)]  # type: ignore[union-attr]
        matrices = [replacements[u].matrix() for u in units if isinstance(replacements[u], LinearEmulator)]  # type: ignore[union-attr]
        bias = torch.stack(biases).sum(0) if biases else None
        matrix = torch.stack(matrices).sum(0) if matrices else None
        if bias is not None and not writer.is_embeddings and _target_module(layout, writer).bias is None:
            proj = layout.spec.fold.proj(writer.kind)  # type: ignore[union-attr]
            if isinstance(proj.bias, BiasFlag):  # type: ignore[union-attr]
                _enable_bias(layout, writer.kind, proj.bias)  # type: ignore[union-attr]
                flags.append(proj.bias.flag)  # type: ignore[union-attr]
        device = _target_module(layout, writer).weight.device
        _apply(layout, writer, None if matrix is None else matrix.to(device), None if bias is None else bias.to(device))
    for unit, reason in refused.items():
        logger.info("%s stays an emulator module: %s", unit, reason)
    remaining = {u: (None if u in targets else e) for u, e in replacements.items()}
    result = FoldResult(
        folded={u: str(w) for u, w in sorted(targets.items())}, refused=dict(sorted(refused.items())), flags=tuple(dict.fromkeys(flags))
    )
    return remaining, result
