"""The ``recover`` stage: stand-ins for removed units, fitted in closed form or learned.

- :mod:`~depthprune.recover.emulate`: bias and low-rank emulators fitted from one
  calibration pass (:func:`fit_emulators`, :func:`recover_`, :func:`emulate`);
- :mod:`~depthprune.recover.learn`: the same modules, or LoRA on the kept layers, trained
  by gradient descent;
- :mod:`~depthprune.recover.compare`: loss against units removed for each method.
"""

from __future__ import annotations

from depthprune.recover.emulate import (
    DEFAULT_RIDGE,
    BiasEmulator,
    EmulationConfig,
    LowRankEmulator,
    RecoverResult,
    UpdateStats,
    collect_updates,
    emulate,
    fit_emulators,
    parse_replace,
    recover_,
    solve_lowrank,
)
from depthprune.recover.install import Installed, install_, kv_cache_bytes

__all__ = [
    "DEFAULT_RIDGE",
    "BiasEmulator",
    "EmulationConfig",
    "Installed",
    "LowRankEmulator",
    "RecoverResult",
    "UpdateStats",
    "collect_updates",
    "emulate",
    "fit_emulators",
    "install_",
    "kv_cache_bytes",
    "parse_replace",
    "recover_",
    "solve_lowrank",
]
