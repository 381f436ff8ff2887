"""Small helpers shared by the evaluation tasks: device, padding, logit selection."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device the model's inputs go to (see :func:`depthprune.devices.input_device`)."""
    from depthprune.devices import input_device

    return input_device(model)


def pad_id_of(tokenizer: Any) -> int:
    """A token id to right-pad with: pad, else EOS, else 0. Padded positions are masked."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into ``(ids, mask)``, both ``(B, T)`` int64, 1 = real token."""
    width = max(len(r) for r in rows)
    from depthprune.devices import HOST

    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=HOST)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=HOST)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=HOST)
        mask[i, : len(row)] = 1
    return ids, mask


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (skips the LM head where unused)."""
    return "logits_to_keep" in _forward_params(model)


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes a KV cache.

    Transformers 5 renamed ``past_key_values`` to ``cache`` (the old name is deprecated).
    """
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache returned by a forward pass, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    past_key_values: Any = None,
) -> torch.Tensor:
    """Logits at ``positions`` of each row, computing the LM head only there when possible.

    Args:
        model: A causal LM.
        input_ids: ``(B, T)`` tokens fed in this call.
        attention_mask: ``(B, P + T)`` mask over the cached prefix (``P`` tokens) and the new ones.
        positions: ``(B, K)`` indices into the ``T`` new tokens.
        past_key_values: A cache holding the prefix, or ``None``.

    Returns:
        ``(B, K, V)`` logits.
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    kwargs["use_cache"] = past_key_values is not None
    if past_key_values is not None:
        kwargs[cache_kwarg(model)] = past_key_values
    if accepts_logits_to_keep(model):
        return model(**kwargs, logits_to_keep=positions).logits  # (B, K, V)
    logits = model(**kwargs).logits  # (B, T, V)
    return torch.take_along_dim(logits, positions[..., None], dim=1)  # (B, K, V)
