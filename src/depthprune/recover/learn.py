"""Learned recovery baselines: gradient descent on the language-model loss.

- ``bias`` / ``lowrank``: the same :class:`~depthprune.recover.emulate.BiasEmulator` and
  :class:`~depthprune.recover.emulate.LowRankEmulator` modules as the closed-form fit, put
  in the removed units' slots and trained end to end with every other weight frozen.
  They start as plain removal: ``b = 0``; ``B = 0`` and ``A`` random as in LoRA; ``mu``
  stays 0 (it is redundant with ``b`` for a trained map).
- ``lora``: the removed units are removed, and LoRA adapters (peft) on every linear layer
  of the remaining attention and MLP modules are trained.

Both train with AdamW for a budget of steps or tokens, on batches drawn from the
calibration sequences in a seeded order; with the same seed the result is the same. The
model stays in eval mode (no dropout), so the only randomness is the seeded one. Learned
emulators are kept in float32 while training, whatever the model's dtype.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from depthprune.architectures import ArchSpec
from depthprune.data import TokenBatches
from depthprune.devices import input_device
from depthprune.errors import InputError, check_choice
from depthprune.progress import counter
from depthprune.recover.emulate import BiasEmulator, LowRankEmulator, emulate
from depthprune.units import ModelLayout, Unit

logger = logging.getLogger(__name__)

LearnMethod = Literal["bias", "lowrank", "lora"]
LEARN_METHODS: tuple[str, ...] = ("bias", "lowrank", "lora")
DEFAULT_STEPS = 100


@dataclass(frozen=True)
class LearnConfig:
    """How to train a learned recovery.

    Attributes:
        method: ``bias`` or ``lowrank`` emulators, or ``lora`` on the remaining layers.
        rank: Rank of the low-rank emulators, or LoRA's ``r``.
        steps: Budget in optimizer steps. At most one of ``steps`` and ``tokens``; with
            neither, :data:`DEFAULT_STEPS`.
        tokens: Budget in training tokens (rounded up to whole steps).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Sequences per step.
        seed: Seeds the initialisation and the batch order.
        lora_alpha: LoRA's scaling numerator; ``2 * rank`` when ``None``.
        lora_targets: Names of the linear modules that get adapters; every linear layer
            in the remaining attention and MLP modules when ``None``.
        show_progress: Show a progress bar on a terminal.
    """

    method: LearnMethod = "bias"
    rank: int = 8
    steps: int | None = None
    tokens: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    seed: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        check_choice(self.method, LEARN_METHODS, "learned method")
        for name in ("rank", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} {value!r} is invalid; expected a whole number >= 1")
        if self.steps is not None and self.tokens is not None:
            raise InputError(f"both steps ({self.steps}) and tokens ({self.tokens}) were given; give one budget")
        for name in ("steps", "tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} {value!r} is invalid; expected a whole number >= 1")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"learning rate {self.lr!r} is invalid; expected a number > 0 such as 1e-3")

    def n_steps(self, seq_len: int) -> int:
        """The budget in steps for sequences of ``seq_len`` tokens."""
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.batch_size * seq_len)))
        return self.steps if self.steps is not None else DEFAULT_STEPS

    @property
    def label(self) -> str:
        """How results name this method: ``learned-bias``, ``learned-lowrank:8``, ``lora:8``."""
        if self.method == "bias":
            return "learned-bias"
        if self.method == "lowrank":
            return f"learned-lowrank:{self.rank}"
        return f"lora:{self.rank}"


@dataclass(frozen=True)
class LearnResult:
    """What a learned recovery did.

    Attributes:
        method: The method's label (see :attr:`LearnConfig.label`).
        steps: Optimizer steps taken.
        tokens: Training tokens seen.
        losses: Training loss of every step.
        seconds: Wall-clock training time.
        trainable_params: Parameters trained.
        emulators: Unit -> trained emulator (``bias``/``lowrank``); empty for LoRA.
        peft_model: The peft model (``lora`` only, valid inside :func:`lora_recovery`).
    """

    method: str
    steps: int
    tokens: int
    losses: tuple[float, ...]
    seconds: float
    trainable_params: int
    emulators: dict[Unit, nn.Module] = field(default_factory=dict)
    peft_model: Any = None


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter of ``model`` inside the block; restore the flags on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _train(
    model: nn.Module, params: list[nn.Parameter], data: TokenBatches, config: LearnConfig, desc: str
) -> tuple[int, int, list[float], float]:
    """AdamW on the next-token loss for the config's budget; returns (steps, tokens, losses, seconds)."""
    if len(data) == 0:
        raise InputError("no training sequences; give more calibration data")
    steps = config.n_steps(int(data.input_ids.shape[1]))
    device = params[0].device if params else input_device(model)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    with torch.enable_grad(), counter(steps, desc=desc, disable=not config.show_progress) as bar:
        for _ in range(steps):
            idx = []
            while len(idx) < min(config.batch_size, len(data)):
                if not order:
                    order = torch.randperm(len(data), generator=g).tolist()
                idx.append(order.pop())
            ids = data.input_ids[idx].to(device)
            mask = data.attention_mask[idx].to(device)
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            if not torch.isfinite(loss):
                raise InputError(f"learned recovery diverged (loss {loss.item()}) at step {len(losses)}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens += int(mask.sum())
            bar.update()
    return steps, tokens, losses, time.perf_counter() - start


def init_learned(kind: str, dim: int, rank: int, device: Any = None) -> nn.Module:
    """A learned emulator that starts as plain removal (zero update), in float32."""
    if kind == "bias":
        return BiasEmulator.empty(dim, torch.float32, device)
    module = LowRankEmulator.empty(dim, rank, torch.float32, device)
    with torch.no_grad():
        nn.init.kaiming_uniform_(module.A.T, a=math.sqrt(5))  # LoRA's init of its down-projection
    module.mu.requires_grad_(False)
    return module


def train_emulators(
    model: nn.Module,
    units: Iterable[Unit],
    data: TokenBatches,
    config: LearnConfig,
    spec: ArchSpec | None = None,
) -> LearnResult:
    """Train a bias or low-rank emulator per unit on the LM loss; the model is left unchanged.

    Args:
        model: The unpruned model.
        units: Units to remove and emulate.
        data: Training sequences.
        config: Method (``bias`` or ``lowrank``), budget and optimizer.
        spec: The family spec; looked up from ``model.config`` when omitted.

    Returns:
        A :class:`LearnResult` whose ``emulators`` plug into :func:`~depthprune.recover.emulate.emulate`.
    """
    if config.method not in ("bias", "lowrank"):
        raise InputError(f"train_emulators trains bias or lowrank emulators, not {config.method!r}; use lora_recovery")
    layout = ModelLayout.of(model, spec)
    device = input_device(model)
    dim = int(model.config.hidden_size)
    torch.manual_seed(config.seed)
    emulators = {u: init_learned(config.method, dim, config.rank, device) for u in sorted(set(units))}
    params = [p for e in emulators.values() for p in e.parameters() if p.requires_grad]
    with _frozen(model), emulate(model, emulators, layout.spec):  # type: ignore[arg-type]
        for p in params:
            p.requires_grad_(True)
        steps, tokens, losses, seconds = _train(model, params, data, config, f"train {config.label}")
    for e in emulators.values():
        e.requires_grad_(False)
    logger.info("%s: %d steps, final loss %.4f", config.label, steps, losses[-1])
    return LearnResult(
        method=config.label,
        steps=steps,
        tokens=tokens,
        losses=tuple(losses),
        seconds=seconds,
        trainable_params=sum(p.numel() for p in params),
        emulators=emulators,
    )


def _linear_names(layout: ModelLayout) -> list[str]:
    """Leaf names of the linear modules inside the attention and MLP modules of the model."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for layer in layout.layers:
        for kind in ("attn", "mlp"):
            root = layer.get_submodule(layout.spec.path(kind).module)
            for name, module in root.named_modules():
                if name and isinstance(module, (nn.Linear, Conv1D)):
                    names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


@contextlib.contextmanager
def lora_recovery(
    model: nn.Module,
    units: Iterable[Unit],
    data: TokenBatches,
    config: LearnConfig,
    spec: ArchSpec | None = None,
) -> Iterator[LearnResult]:
    """Inside the block, ``units`` are removed and LoRA adapters on the remaining layers are trained.

    On exit the adapters are unloaded and the units put back, so the model is exactly as
    before. Save the adapters inside the block with ``result.peft_model.save_pretrained``.

    Args:
        model: The unpruned model.
        units: Units to remove.
        data: Training sequences.
        config: ``method="lora"``, rank, budget and optimizer.
        spec: The family spec; looked up from ``model.config`` when omitted.
    """
    from peft import LoraConfig, get_peft_model

    if config.method != "lora":
        raise InputError(f"lora_recovery trains LoRA adapters, not {config.method!r}; use train_emulators")
    layout = ModelLayout.of(model, spec)
    with _frozen(model), emulate(model, dict.fromkeys(set(units)), layout.spec):
        targets = list(config.lora_targets) if config.lora_targets else _linear_names(layout)
        if not targets:
            raise InputError("no linear layers are left to adapt with LoRA; remove fewer units")
        torch.manual_seed(config.seed)
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.rank,
            lora_dropout=0.0,
            target_modules=targets,
            bias="none",
        )
        peft_model = get_peft_model(model, lora)
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            steps, tokens, losses, seconds = _train(peft_model, params, data, config, f"train {config.label}")
            for p in params:
                p.requires_grad_(False)
            logger.info("%s: %d steps, final loss %.4f", config.label, steps, losses[-1])
            yield LearnResult(
                method=config.label,
                steps=steps,
                tokens=tokens,
                losses=tuple(losses),
                seconds=seconds,
                trainable_params=sum(p.numel() for p in params),
                peft_model=peft_model,
            )
        finally:
            peft_model.unload()
