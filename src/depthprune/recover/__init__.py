"""The ``recover`` stage: stand-ins for removed units, fitted in closed form or learned.

- :mod:`~depthprune.recover.emulate`: bias, low-rank and linear emulators fitted from one
  calibration pass (:func:`fit_emulators`, :func:`recover_`, :func:`emulate`);
- :mod:`~depthprune.recover.fold`: bias and linear emulators folded into stock weights
  (:func:`fold_`);
- :mod:`~depthprune.recover.select`: the held-out check that keeps an emulator only where
  it beats plain removal;
- :mod:`~depthprune.recover.learn`: the same modules, or LoRA on the kept layers, trained
  by gradient descent;
- :mod:`~depthprune.recover.compare`: loss against units removed for each method.
"""

from __future__ import annotations

from depthprune.recover.emulate import (
    DEFAULT_RIDGE,
    BiasEmulator,
    EmulationConfig,
    LinearEmulator,
    LowRankEmulator,
    RecoverResult,
    UpdateStats,
    collect_updates,
    emulate,
    fit_emulators,
    parse_replace,
    recover_,
    solve_linear,
    solve_lowrank,
)
from depthprune.recover.fold import FoldResult, fold_
from depthprune.recover.install import Installed, install_, kv_cache_bytes

__all__ = [
    "DEFAULT_RIDGE",
    "BiasEmulator",
    "EmulationConfig",
    "FoldResult",
    "Installed",
    "LinearEmulator",
    "LowRankEmulator",
    "RecoverResult",
    "UpdateStats",
    "collect_updates",
    "emulate",
    "fit_emulators",
    "fold_",
    "install_",
    "kv_cache_bytes",
    "parse_replace",
    "recover_",
    "solve_linear",
    "solve_lowrank",
]
