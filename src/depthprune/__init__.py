"""depthprune: find, remove and repair the least important layers of decoder LLMs."""

from __future__ import annotations

__version__ = "0.1.0"

# Importing depthprune registers the depthprune_<family> Auto classes, so exports with
# removed sublayers or emulators load with AutoModelForCausalLM (see depthprune.pruned_classes).
from depthprune.pruned_classes import load  # noqa: E402

__all__ = ["__version__", "load"]
