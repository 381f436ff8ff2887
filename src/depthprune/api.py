"""High-level entry points that chain loading, a stage and writing, as the CLI uses them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from depthprune._fs import check_output
from depthprune.architectures import spec_for_config
from depthprune.data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, context_length, load_calibration
from depthprune.errors import InputError, check_choice
from depthprune.export import EXPORT_FORMATS, ExportFormat, export
from depthprune.loading import DType, load_config, load_model
from depthprune.plan import check_replace, plan_units, read_plan
from depthprune.prune import PruneResult, prune_
from depthprune.pruned_classes import to_depthpruned_
from depthprune.recover.emulate import DEFAULT_RIDGE, EmulationConfig, fit_emulators
from depthprune.recover.install import check_replacements
from depthprune.units import Unit, parse_units

logger = logging.getLogger(__name__)


def prune_model(
    model: str,
    *,
    remove: str | None = None,
    plan: str | Path | None = None,
    out: str | Path,
    recover: str | None = None,
    data: str | Path | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    text_field: str = "text",
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = 8,
    export_format: ExportFormat = "hf",
    force: bool = False,
    dtype: DType = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    dry_run: bool = False,
    show_progress: bool = True,
) -> PruneResult:
    """Load ``model``, remove units (optionally emulating them), and export it to ``out``.

    Everything that can be checked before loading weights is checked first: the output
    path, the family, the unit names against the config's layer count, the replacements,
    and that emulation has data.

    When only whole blocks go and nothing is emulated, the export is a standard checkpoint
    of the same architecture. Otherwise it is a ``depthprune_<family>`` checkpoint (see
    :mod:`depthprune.pruned_classes`): blocks without an emulator are still deleted, removed
    sublayers and emulated blocks keep a slot with a no-op or an emulator, and the folder
    loads with ``depthprune.load`` or, after ``import depthprune``, ``AutoModelForCausalLM``.

    Args:
        model: A local model folder or a Hub id.
        remove: Comma-separated units to remove, e.g. ``"block.3,attn.5"``.
        plan: A ``plan.json`` (from ``depthprune plan`` or written by hand) naming the
            units and their replacements instead; exactly one of ``remove`` and ``plan``
            must be given. Its document is stored as the ``plan`` field of ``depthprune.json``.
        out: The output folder.
        recover: ``none``, ``bias`` or ``lowrank:R`` for every removed unit, overriding the
            plan's ``replace`` values; ``None`` keeps them (``none`` with ``remove``).
        data: Calibration text for fitting emulators (see :func:`depthprune.data.read_texts`).
        n_samples: Calibration sequences.
        seq_len: Tokens per calibration sequence (capped by the model's context).
        seed: Chooses the calibration windows.
        text_field: Field of JSONL records or dataset rows that holds the text.
        ridge: Relative ridge of low-rank fits (see :mod:`depthprune.recover.emulate`).
        batch_size: Sequences per forward pass of the fit.
        export_format: ``hf``, or ``nemotron-nas`` for a DeciLM-style config that vLLM serves
            (Llama/Mistral families, no emulators).
        force: Replace an existing ``out``.
        dtype: Weight dtype to load with.
        device: Torch device to load on.
        trust_remote_code: Allow code from the model repository to run.
        dry_run: Do everything except writing ``out``.
        show_progress: Show a progress bar while fitting.

    Raises:
        InputError: neither or both of ``remove`` and ``plan``, bad units or replacements,
            emulation without ``data``, or a format that cannot express the result.
    """
    if remove and plan:
        raise InputError("both --remove and --plan were given; pass only one of them")
    if not remove and not plan:
        raise InputError("nothing to remove; pass --remove block.N[,block.M...] or --plan plan.json")
    if recover is not None:
        check_replace(recover, "--recover value")
    check_choice(export_format, EXPORT_FORMATS, "export format")
    plan_doc = read_plan(plan) if plan else None
    if not dry_run:
        check_output(out, force)
    config, local = load_config(model, trust_remote_code)
    spec = spec_for_config(config)
    n_layers = getattr(config, spec.num_layers_key)
    if plan_doc is not None:
        entries = plan_units(plan_doc, n_layers, where=f"plan file {str(plan)!r}")
    else:
        entries = [(u, "none") for u in parse_units(remove.split(","), n_layers)]  # type: ignore[union-attr]
    if recover is not None:
        entries = [(u, recover) for u, _ in entries]
    table = dict(entries)
    check_replacements(table, n_layers)
    dropped = sum(1 for u, r in entries if u.kind == "block" and r == "none")
    if dropped >= n_layers:
        raise InputError(f"cannot remove every block: the model has {n_layers} layers and {dropped} were given")
    emulated = [f"{u} -> {r}" for u, r in entries if r != "none"]
    if emulated and data is None:
        raise InputError(f"{', '.join(emulated)} must be fitted on calibration data; pass --data (or --recover none)")
    if emulated and export_format == "nemotron-nas":
        raise InputError(
            f"the nemotron-nas format supports no_op only and cannot express emulators ({', '.join(emulated)}); "
            "use --format hf, or --recover none"
        )
    # `local` is the model folder, or the folder holding a .gguf file, which is itself refused too.
    if local is not None and Path(out).resolve() in (local.resolve(), Path(model).expanduser().resolve()):
        raise InputError(f"refusing to write {str(out)!r}: it is or holds the source model {str(model)!r}; choose another -o")
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    calibration = None
    if all(u.kind == "block" and r == "none" for u, r in entries):
        result = prune_(loaded.model, [u for u, _ in entries], loaded.spec)
    else:
        replacements: dict[Unit, Any] = dict.fromkeys(table)
        if emulated:
            calibration = load_calibration(
                data,  # type: ignore[arg-type]
                loaded.tokenizer,
                n_sequences=n_samples,
                seq_len=seq_len,
                seed=seed,
                max_context=context_length(loaded.model),
                text_field=text_field,
            )
            fit = EmulationConfig(ridge=ridge, batch_size=batch_size, show_progress=show_progress)
            replacements = fit_emulators(loaded.model, calibration, table, fit, loaded.spec)
        result = to_depthpruned_(loaded.model, replacements, loaded.spec)
    if dry_run:
        return result
    manifest = {
        "source": {"model": model, "family": loaded.spec.family, "n_layers": result.n_layers_before},
        "removed": [str(u) for u in result.removed],
        "index_map": {"layers": {str(k): v for k, v in result.index_map.items()}},
        "emulated": {str(u): r for u, r in entries if r != "none"},
        "recover": None
        if calibration is None
        else {"method": "closed_form", "ridge": ridge, "calibration": calibration.info.to_dict()},
        "plan": plan_doc,
        "scores": None,
    }
    export(
        loaded.model,
        out,
        tokenizer=loaded.tokenizer,
        manifest=manifest,
        force=force,
        source_dir=local,
        export_format=export_format,
    )
    return result
