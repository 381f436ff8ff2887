"""``python -m depthprune`` runs the CLI."""

from __future__ import annotations

import sys

from depthprune.cli import main

sys.exit(main())
