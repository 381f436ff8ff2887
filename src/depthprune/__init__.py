"""depthprune: find, remove and repair the least important layers of decoder LLMs."""

from __future__ import annotations

__version__ = "0.1.0"
from depthprune.modeling import load  # noqa: E402  (also registers the Auto classes, see depthprune.modeling)
