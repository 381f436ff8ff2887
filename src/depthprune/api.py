"""High-level entry points that chain loading, a stage and writing, as the CLI uses them."""

from __future__ import annotations

import logging
from pathlib import Path

from depthprune._fs import check_output
from depthprune.architectures import spec_for_config
from depthprune.errors import InputError
from depthprune.export import export
from depthprune.models import DType, load_config, load_model
from depthprune.prune import PruneResult, prune_, validate_removal

logger = logging.getLogger(__name__)


def prune_model(
    model: str,
    *,
    remove: str | None,
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
    """
    if not remove:
        raise InputError("nothing to remove; pass --remove block.N[,block.M...]")
    if not dry_run:
        check_output(out, force)
    config, local = load_config(model, trust_remote_code)
    spec = spec_for_config(config)
    n_layers = getattr(config, spec.num_layers_key)
    units = validate_removal(remove.split(","), n_layers)
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
        "plan": None,
        "scores": None,
    }
    export(loaded.model, out, tokenizer=loaded.tokenizer, manifest=manifest, force=force, source_dir=local)
    return result
