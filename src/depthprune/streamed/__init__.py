"""Layer-streamed execution, for models larger than memory.

The model is a skeleton on the meta device; each decoder layer is read from the
memory-mapped safetensors checkpoint when it runs, all batches pass it, and it is freed.
Masked evaluations advance together as branches that share their unmasked prefix, so each
layer is read once per pass. Activations beyond a memory budget spill to a temporary
folder that is always removed. See ``docs/streaming.md``.
"""

from __future__ import annotations

from depthprune.streamed.checkpoint import LazyCheckpoint, checkpoint_files
from depthprune.streamed.runner import (
    StreamConfig,
    StreamedModel,
    branch_of,
    parse_bytes,
)
from depthprune.streamed.spill import ActivationStore, SpillSpaceError
from depthprune.streamed.tasks import (
    check_stream_metrics,
    perplexity_streamed,
    score_streamed,
)

__all__ = [
    "ActivationStore",
    "LazyCheckpoint",
    "SpillSpaceError",
    "StreamConfig",
    "StreamedModel",
    "branch_of",
    "check_stream_metrics",
    "checkpoint_files",
    "open_streamed",
    "parse_bytes",
    "perplexity_streamed",
    "score_streamed",
]


def open_streamed(model: str, config: StreamConfig | None = None, **load: object) -> StreamedModel:
    """A :class:`StreamedModel` of a local safetensors model folder (no weights read yet).

    Args:
        model: The model folder.
        config: Memory budget and spilling.
        **load: ``dtype``, ``device``, ``trust_remote_code``, ``attn_implementation``.
    """
    return StreamedModel(LazyCheckpoint.open(model, **load), config)  # type: ignore[arg-type]
