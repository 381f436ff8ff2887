"""High-level entry points that chain loading, a stage and writing, as the CLI uses them."""

from __future__ import annotations

import logging
from pathlib import Path

from depthprune._fs import check_output
from depthprune.architectures import spec_for_config
from depthprune.errors import InputError
from depthprune.export import export
from depthprune.models import DType, load_config, load_model
from depthprune.plan import plan_units, read_plan
from depthprune.prune import PruneResult, prune_, validate_removal

logger = logging.getLogger(__name__)


def prune_model(
    model: str,
    *,
    remove: str | None = None,
    plan: str | Path | None = None,
    out: str | Path,
    force: bool = False,
    dtype: DType = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    dry_run: bool = False,
) -> PruneResult:
    """Load ``model``, remove whole blocks, and export a standard checkpoint to ``out``.

    Everything that can be checked before loading weights is checked first: the output
    path, the family, and the unit names against the config's layer count.

    Args:
        model: A local model folder or a Hub id.
        remove: Comma-separated units to remove, e.g. ``"block.3,block.5"``.
        plan: A ``plan.json`` (from ``depthprune plan`` or written by hand) naming the
            units instead; exactly one of ``remove`` and ``plan`` must be given. Its
            document is stored as the ``plan`` field of ``depthprune.json``.
        out: The output folder.
        force: Replace an existing ``out``.
        dtype: Weight dtype to load with.
        device: Torch device to load on.
        trust_remote_code: Allow code from the model repository to run.
        dry_run: Do everything except writing ``out``.

    Raises:
        InputError: neither or both of ``remove`` and ``plan``, bad units, or a plan that
            asks for a replacement other than ``none``.
    """
    if remove and plan:
        raise InputError("both --remove and --plan were given; pass only one of them")
    if not remove and not plan:
        raise InputError("nothing to remove; pass --remove block.N[,block.M...] or --plan plan.json")
    plan_doc = read_plan(plan) if plan else None
    if not dry_run:
        check_output(out, force)
    config, local = load_config(model, trust_remote_code)
    spec = spec_for_config(config)
    n_layers = getattr(config, spec.num_layers_key)
    if plan_doc is not None:
        entries = plan_units(plan_doc, n_layers, where=f"plan file {str(plan)!r}")
        emulated = [f"{unit} -> {replace}" for unit, replace in entries if replace != "none"]
        if emulated:
            raise InputError(
                f"plan file {str(plan)!r} replaces {', '.join(emulated)}: recovery is not implemented yet; "
                'set "replace": "none" for every unit'
            )
        units = validate_removal([unit for unit, _ in entries], n_layers)
    else:
        units = validate_removal(remove.split(","), n_layers)  # type: ignore[union-attr]
    if local is not None and Path(out).resolve() == local.resolve():
        raise InputError(f"refusing to write into the source model folder {str(local)!r}; choose another -o")
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    result = prune_(loaded.model, units, loaded.spec)
    if dry_run:
        return result
    manifest = {
        "source": {"model": model, "family": loaded.spec.family, "n_layers": result.n_layers_before},
        "removed": [str(u) for u in result.removed],
        "index_map": {"layers": {str(k): v for k, v in result.index_map.items()}},
        "emulated": {},
        "plan": plan_doc,
        "scores": None,
    }
    export(loaded.model, out, tokenizer=loaded.tokenizer, manifest=manifest, force=force, source_dir=local)
    return result
