"""High-level entry points that chain loading, a stage and writing, as the CLI uses them."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthprune._fs import check_output
from depthprune.architectures import spec_for_config
from depthprune.data import (
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    TokenBatches,
    context_length,
    load_calibration,
)
from depthprune.distributed import is_writer
from depthprune.errors import InputError, check_choice
from depthprune.export import EXPORT_FORMATS, ExportFormat, export
from depthprune.gguf_export import (
    check_gguf_emulators,
    check_gguf_family,
    check_gguf_type,
)
from depthprune.identity import check_made_for
from depthprune.loading import LoadConfig, load_config, load_model
from depthprune.nemotron_nas import (
    check_family,
    check_nemotron_nas_plan,
    refuse_emulators,
)
from depthprune.plan import check_replace, plan_units, read_plan
from depthprune.prune import PruneResult, prune_
from depthprune.pruned_classes import to_depthpruned_
from depthprune.recover.emulate import (
    DEFAULT_RIDGE,
    EmulationConfig,
    fit_emulators,
    parse_replace,
)
from depthprune.recover.fold import FoldResult, fold_
from depthprune.recover.install import check_replacements
from depthprune.recover.select import DEFAULT_HELDOUT, select_emulators, split_tail
from depthprune.units import Unit, parse_units

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneConfig:
    """What to remove from a model, how to repair it, and where to write it.

    Attributes:
        out: The output folder (a ``str`` is turned into a ``Path``).
        remove: The units to remove, e.g. ``"block.3,attn.5"`` or ``[Unit("block", 3)]``;
            stored as sorted, unique :class:`~depthprune.units.Unit` s and checked
            against the model's layer count when it is read. Exactly one of ``remove``
            and ``plan`` must be given.
        plan: A ``plan.json`` (from ``depthprune plan`` or written by hand) naming the
            units and their replacements instead. Its document is stored as the ``plan``
            field of ``depthprune.json``.
        recover: ``none``, ``bias``, ``lowrank:R`` or ``linear:R`` (``linear:full``) for every
            removed unit, overriding the plan's ``replace`` values; ``None`` keeps them
            (``none`` with ``remove``).
        data: Calibration text for fitting emulators (see :func:`depthprune.data.read_texts`).
        n_samples: Calibration sequences.
        seq_len: Tokens per calibration sequence (capped by the model's context).
        seed: Chooses the calibration windows.
        text_field: Field of JSONL records or dataset rows that holds the text.
        ridge: Relative ridge of low-rank fits (see :mod:`depthprune.recover.emulate`).
        batch_size: Sequences per forward pass of the fit.
        fold: Fold bias and linear emulators into the weights of the kept layers where
            that is exact (:mod:`depthprune.recover.fold`); with only blocks removed and
            everything folded, the export is a standard checkpoint. ``False`` keeps every
            emulator a module (a ``depthprune_<family>`` export).
        heldout: Fraction of the calibration sequences (the last ones) held out to check
            each fitted emulator against plain removal; an emulator that does not lower
            the held-out loss is dropped (:mod:`depthprune.recover.select`). ``0`` keeps
            every emulator unchecked and fits on all sequences.
        export_format: ``hf``, ``nemotron-nas`` for a DeciLM-style config that vLLM
            serves (no emulators), or ``gguf`` for one ``.gguf`` file that llama.cpp runs
            (emulators only where they fold into stock weights); both for families whose
            architecture file allows it.
        gguf_type: ``f32``, ``f16`` or ``bf16``, the matrices' type in a ``gguf`` export;
            ``None`` means ``f32``, and is the only value other formats accept.
        force: Replace an existing ``out``.
        dry_run: Do everything except writing ``out``.
        show_progress: Show a progress bar while fitting.
        rewrite_shards: When nothing is emulated and the format is ``hf``, prune a local
            safetensors checkpoint by rewriting its shards tensor by tensor, without
            loading the model (see :mod:`depthprune.shard_prune`); ``False`` always
            loads it. Both write the same tensors.
        stream: A :class:`~depthprune.streamed.StreamConfig`: fit the emulators and run
            the held-out check layer-streamed from the safetensors checkpoint
            (:mod:`depthprune.streamed.recover`). The export still loads the model
            unless every emulator is dropped. ``None``: everything in memory.
    """

    out: Path
    remove: tuple[Unit, ...] = ()
    plan: Path | None = None
    recover: str | None = None
    data: str | None = None
    n_samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    text_field: str = "text"
    ridge: float = DEFAULT_RIDGE
    batch_size: int = 8
    fold: bool = True
    heldout: float = DEFAULT_HELDOUT
    export_format: ExportFormat = "hf"
    gguf_type: str | None = None
    force: bool = False
    dry_run: bool = False
    show_progress: bool = True
    rewrite_shards: bool = True
    stream: Any = None

    def __post_init__(self) -> None:
        # Parse at the boundary: paths become Paths and unit names Units, once.
        object.__setattr__(self, "out", Path(self.out))
        if self.plan is not None:
            object.__setattr__(self, "plan", Path(self.plan))
        if self.data is not None:
            object.__setattr__(self, "data", os.fspath(self.data))
        object.__setattr__(self, "remove", _as_units(self.remove))
        if self.remove and self.plan is not None:
            raise InputError("both --remove and --plan were given; pass only one of them")
        if not self.remove and self.plan is None:
            raise InputError("nothing to remove; pass --remove block.N[,block.M...] or --plan plan.json")
        if self.recover is not None:
            check_replace(self.recover, "--recover value")
        check_choice(self.export_format, EXPORT_FORMATS, "export format")
        if self.gguf_type is not None:
            if self.export_format != "gguf":
                raise InputError(f"--gguf-type {self.gguf_type} applies to --format gguf only; this export is {self.export_format!r}")
            check_gguf_type(self.gguf_type)
        for name, least in (("n_samples", 1), ("seq_len", 2), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{name} {value!r} is invalid; expected a whole number >= {least}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise InputError(f"text_field {self.text_field!r} is invalid; expected a field name such as text")
        if isinstance(self.heldout, bool) or not isinstance(self.heldout, (int, float)) or not 0 <= self.heldout < 1:
            raise InputError(f"held-out fraction {self.heldout!r} is invalid; expected a number in [0, 1), e.g. 0.2")
        for name in ("force", "dry_run", "show_progress", "fold", "rewrite_shards"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} {getattr(self, name)!r} is invalid; expected true or false")
        self.emulation()  # checks ridge and batch_size

    def emulation(self) -> EmulationConfig:
        """The settings of the closed-form fit of emulated units."""
        return EmulationConfig(ridge=self.ridge, batch_size=self.batch_size, show_progress=self.show_progress)


def _as_units(remove: str | Iterable[str | Unit] | None) -> tuple[Unit, ...]:
    if remove is None or (isinstance(remove, str) and not remove.strip()):
        return ()
    items = list(remove.split(",") if isinstance(remove, str) else remove)
    return tuple(parse_units(items)) if items else ()


def prune_model(load: LoadConfig, prune: PruneConfig) -> PruneResult:
    """Load a model, remove units (optionally emulating them), and export it.

    Everything that can be checked before loading weights is checked first: the output
    path, the family, the unit names against the config's layer count, the replacements,
    that emulation has data, and that the export format can express the result.

    With emulation, the last ``heldout`` part of the calibration sequences checks each
    fitted emulator against plain removal (:func:`depthprune.recover.select.select_emulators`),
    and with ``fold`` the bias and linear emulators that fold exactly into the kept
    weights are folded (:func:`depthprune.recover.fold.fold_`). ``depthprune.json`` records
    per unit the decision, both held-out losses, and where it was folded or why not.

    When only whole blocks go and nothing is left emulated (none asked for, or every
    emulator dropped or folded), the export is a standard checkpoint of the same
    architecture. Otherwise it is a ``depthprune_<family>`` checkpoint (see
    :mod:`depthprune.pruned_classes`): blocks without an emulator are still deleted, removed
    sublayers and emulated blocks keep a slot with a no-op or an emulator, and the folder
    loads with ``depthprune.load`` or, after ``import depthprune``, ``AutoModelForCausalLM``.

    Args:
        load: Which model to load, and how.
        prune: What to remove, how to repair it, and where to write it.

    Returns:
        What was removed, with the layer and parameter counts before and after.

    Raises:
        InputError: bad units or replacements, emulation without data, or a format that
            cannot express the result.
    """
    plan_doc = read_plan(prune.plan) if prune.plan is not None else None
    sources = {"models": [load.model], "inputs": [prune.plan, prune.data]}
    if not prune.dry_run:
        check_output(prune.out, prune.force, "file" if prune.export_format == "gguf" else "dir", **sources)
    config, local = load_config(load)
    spec = spec_for_config(config)
    n_layers = spec.num_layers(config)
    if plan_doc is not None:
        check_made_for(
            plan_doc, config, n_layers, f"plan file {str(prune.plan)!r}", load.model, "make the plan from this model's scores"
        )
        entries = plan_units(plan_doc, n_layers, where=f"plan file {str(prune.plan)!r}")
    else:
        entries = [(u, "none") for u in prune.remove]
    if prune.recover is not None:
        entries = [(u, prune.recover) for u, _ in entries]
    table = dict(entries)
    check_replacements(table, n_layers)
    _check_ranks(entries, config)
    dropped = sum(1 for u, r in entries if u.kind == "block" and r == "none")
    if dropped >= n_layers:
        raise InputError(f"cannot remove every block: the model has {n_layers} layers and {dropped} were given")
    emulated = [f"{u} -> {r}" for u, r in entries if r != "none"]
    if emulated and prune.data is None:
        raise InputError(f"{', '.join(emulated)} must be fitted on calibration data; pass --data (or --recover none)")
    if prune.export_format == "nemotron-nas":
        refuse_emulators(emulated)
        check_family(spec)
        check_nemotron_nas_plan(table)
    if prune.export_format == "gguf":
        # bias and linear:R may fold into stock weights (one that does not is refused at
        # export); a low-rank emulator reads the stream and never folds.
        check_gguf_family(spec, config)
        never_fold = [f"{u} -> {r}" for u, r in entries if parse_replace(r)[0] == "lowrank"]
        check_gguf_emulators(never_fold)
    if not emulated and prune.export_format == "hf" and prune.rewrite_shards:
        rewritten = _prune_on_disk(load, prune, config, local, spec, table, plan_doc, entries, sources)
        if rewritten is not None:
            return rewritten
    streamed_fit = _fit_streamed(load, table, prune) if prune.stream is not None and emulated else None
    if streamed_fit is not None and all(e is None for e in streamed_fit[1].values()) and prune.export_format == "hf" and prune.rewrite_shards:
        # Every emulator lost the held-out check: plain removal, so the shards can be
        # rewritten without loading the model, as when nothing is emulated.
        doc = _recovery_doc(streamed_fit[0], table, prune, streamed_fit[2], FoldResult(), "layer-streamed")
        recover = {"method": "closed_form", "ridge": prune.ridge, **doc}
        rewritten = _prune_on_disk(load, prune, config, local, spec, table, plan_doc, entries, sources, recover)
        if rewritten is not None:
            return rewritten
    loaded = load_model(load)
    params_source = sum(p.numel() for p in loaded.model.parameters())  # before a fold adds biases
    calibration = None
    recovery: dict[str, Any] | None = None
    if all(u.kind == "block" and r == "none" for u, r in entries):
        result = prune_(loaded.model, [u for u, _ in entries], loaded.spec)
    else:
        replacements: dict[Unit, Any] = dict.fromkeys(table)
        if streamed_fit is not None:
            calibration = streamed_fit[0]
            replacements, recovery = _recover(loaded, calibration, table, prune, streamed_fit[1:])
        elif emulated:
            calibration = load_calibration(
                prune.data,  # type: ignore[arg-type]
                loaded.tokenizer,
                n_sequences=prune.n_samples,
                seq_len=prune.seq_len,
                seed=prune.seed,
                max_context=context_length(loaded.model),
                text_field=prune.text_field,
            )
            replacements, recovery = _recover(loaded, calibration, table, prune)
        if all(u.kind == "block" and e is None for u, e in replacements.items()):
            result = prune_(loaded.model, list(replacements), loaded.spec)
        else:
            result = to_depthpruned_(loaded.model, replacements, loaded.spec)
    result = dataclasses.replace(result, params_before=params_source)
    if prune.dry_run or not is_writer():  # under torchrun every rank fits; rank 0 alone writes
        return result
    manifest = _manifest(load, loaded.spec.family, result, entries, plan_doc)
    if calibration is not None:
        manifest["recover"] = {"method": "closed_form", "ridge": prune.ridge, **(recovery or {})}
    export(
        loaded.model,
        prune.out,
        tokenizer=loaded.tokenizer,
        manifest=manifest,
        force=prune.force,
        source_dir=local,
        sources=sources,
        export_format=prune.export_format,
        gguf_type=prune.gguf_type or "f32",
    )
    return result


def _manifest(
    load: LoadConfig, family: str, result: PruneResult, entries: list[tuple[Unit, str]], plan_doc: Any
) -> dict[str, Any]:
    return {
        "source": {"model": load.model, "family": family, "n_layers": result.n_layers_before},
        "removed": [str(u) for u in result.removed],
        "index_map": {"layers": {str(k): v for k, v in result.index_map.items()}},
        "emulated": {str(u): r for u, r in entries if r != "none"},
        "recover": None,
        "plan": plan_doc,
        "scores": None,
    }


def _prune_on_disk(
    load: LoadConfig,
    prune: PruneConfig,
    config: Any,
    local: Path | None,
    spec: Any,
    table: dict[Unit, str],
    plan_doc: Any,
    entries: list[tuple[Unit, str]],
    sources: dict[str, Any],
    recover: dict[str, Any] | None = None,
) -> PruneResult | None:
    """Prune by rewriting the safetensors shards (see :mod:`depthprune.shard_prune`), or ``None``.

    ``recover``, when given, is the manifest's ``recover`` entry (emulators fitted and all dropped).

    ``None`` means the source is not a local safetensors checkpoint that maps one-to-one
    onto the model, and the caller loads the model instead.
    """
    from depthprune.export import export_rewritten
    from depthprune.gguf_import import is_gguf_path
    from depthprune.loading import DTYPES, load_tokenizer_for
    from depthprune.shard_prune import plan_rewrite

    if local is None or is_gguf_path(load.model):
        return None
    plan = plan_rewrite(local, config, spec, dict.fromkeys(table), load.trust_remote_code)
    if plan is None:
        return None
    result: PruneResult = plan.result
    if prune.dry_run or not is_writer():  # under torchrun, rank 0 alone rewrites the shards
        return result
    dtype = None if load.dtype == "auto" else DTYPES[load.dtype]
    tokenizer = load_tokenizer_for(load.model, local, load.trust_remote_code) if load.load_tokenizer else None
    export_rewritten(
        plan,
        prune.out,
        dtype=dtype,
        tokenizer=tokenizer,
        generation_config=_generation_config(local, plan.skeleton),
        manifest={**_manifest(load, spec.family, result, entries, plan_doc), **({"recover": recover} if recover else {})},
        force=prune.force,
        sources={**sources, "models": [*sources.get("models", ()), local]},
    )
    return result


def _generation_config(local: Path, skeleton: Any) -> Any | None:
    """The generation config ``from_pretrained`` would give the model, as ``save_pretrained`` writes it."""
    from transformers import GenerationConfig

    if (local / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(local))
    return skeleton.generation_config if skeleton.can_generate() else None


def _check_ranks(entries: list[tuple[Unit, str]], config: Any) -> None:
    """Refuse a ``linear:R`` rank above the model's width before anything is loaded."""
    width = getattr(config, "hidden_size", None)
    for unit, replace in entries:
        kind, rank = parse_replace(replace)
        if kind == "linear" and isinstance(width, int) and rank > width:
            raise InputError(
                f"rank {rank} of {unit} -> {replace} is out of range: the model's width is {width}; "
                f"use linear:R with 1 <= R <= {width}, or linear:full"
            )


def _fit_streamed(load: LoadConfig, table: dict[Unit, str], prune: PruneConfig) -> tuple[TokenBatches, dict[Unit, Any], dict[Unit, Any]]:
    """Fit the emulators of ``table`` and check them on held-out sequences, layer-streamed.

    Returns:
        The calibration data, the replacements kept, and the held-out decisions.
    """
    from depthprune.distributed import rank_device
    from depthprune.loading import load_tokenizer_for
    from depthprune.streamed import open_streamed
    from depthprune.streamed.recover import (
        fit_emulators_streamed,
        select_emulators_streamed,
    )

    device = rank_device(load.device)
    streamed = open_streamed(load.model, prune.stream, dtype=load.dtype, device=device, trust_remote_code=load.trust_remote_code)
    tokenizer = load_tokenizer_for(load.model, Path(streamed.ckpt.source), load.trust_remote_code)
    calibration = load_calibration(
        prune.data,  # type: ignore[arg-type]
        tokenizer,
        n_sequences=prune.n_samples,
        seq_len=prune.seq_len,
        seed=prune.seed,
        max_context=context_length(streamed.model),
        text_field=prune.text_field,
    )
    fit, heldout = split_tail(calibration, prune.heldout)
    replacements = fit_emulators_streamed(streamed, fit, table, prune.emulation())
    decisions: dict[Unit, Any] = {}
    if heldout is not None:
        replacements, decisions = select_emulators_streamed(streamed, replacements, heldout, prune.batch_size, prune.show_progress)
    elif prune.heldout > 0:
        logger.warning("only %d calibration sequence(s): no emulator is checked against plain removal", len(calibration))
    logger.info("streamed fit and check read %d decoder layers", streamed.layer_reads)
    return calibration, replacements, decisions


def _recover(
    loaded: Any,
    calibration: TokenBatches,
    table: dict[Unit, str],
    prune: PruneConfig,
    fitted: tuple[dict[Unit, Any], dict[Unit, Any]] | None = None,
) -> tuple[dict[Unit, Any], dict[str, Any]]:
    """Fit, check on held-out sequences, and fold the stand-ins of ``table``.

    Args:
        fitted: Replacements and decisions already made (by the streamed fit); then only
            the fold is left.

    Returns:
        The replacements to install (``None`` where removal is plain, dropped or folded),
        and the ``recover`` part of ``depthprune.json`` without method and ridge.
    """
    model, spec = loaded.model, loaded.spec
    fit, heldout = split_tail(calibration, prune.heldout)
    decisions: dict[Unit, Any] = {}
    if fitted is not None:
        replacements, decisions = dict(fitted[0]), dict(fitted[1])
    else:
        replacements = fit_emulators(model, fit, table, prune.emulation(), spec)
        if heldout is not None:
            replacements, decisions = select_emulators(model, replacements, heldout, spec, prune.batch_size, prune.show_progress)
        elif prune.heldout > 0:
            logger.warning("only %d calibration sequence(s): no emulator is checked against plain removal", len(calibration))
    folding = FoldResult()
    if prune.fold:
        replacements, folding = fold_(model, replacements, spec)
    execution = "layer-streamed" if fitted is not None else "in-memory"
    return replacements, _recovery_doc(calibration, table, prune, decisions, folding, execution)


def _recovery_doc(
    calibration: TokenBatches,
    table: dict[Unit, str],
    prune: PruneConfig,
    decisions: dict[Unit, Any],
    folding: FoldResult,
    execution: str,
) -> dict[str, Any]:
    """The ``recover`` part of ``depthprune.json`` without method and ridge."""
    fit, heldout = split_tail(calibration, prune.heldout)
    units: dict[str, Any] = {}
    for unit, replace in sorted(table.items()):
        if replace == "none":
            continue
        entry = decisions[unit].to_dict() if unit in decisions else {"replace": replace, "decision": "keep (unchecked)"}
        entry["folded_into"] = folding.folded.get(unit)
        if unit in folding.refused and entry["decision"] != "drop":
            entry["fold_refused"] = folding.refused[unit]
        units[str(unit)] = entry
    return {
        "calibration": calibration.info.to_dict(),
        "fit": fit.info.to_dict(),
        "heldout": None if heldout is None else heldout.info.to_dict(),
        "fold": prune.fold,
        "execution": execution,
        "bias_flags": list(folding.flags),
        "units": units,
    }


__all__ = ["PruneConfig", "prune_model"]
