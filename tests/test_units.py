"""Unit names and the masking context manager, for every family."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import N_LAYERS, tiny_model
from torch import nn
from transformers import DynamicCache

from depthprune.architectures import get_submodule
from depthprune.errors import InputError
from depthprune.units import (
    ModelLayout,
    Unit,
    all_units,
    mask_units,
    parse_units,
    swap_units_,
)


def test_parse_units_sorted_and_validated() -> None:
    assert parse_units("mlp.1, block.3,attn.0", 4) == [Unit("attn", 0), Unit("block", 3), Unit("mlp", 1)]
    # A repeated unit is a typo, not something to drop silently (issue 13, class 7).
    with pytest.raises(InputError, match="block.3 is given twice"):
        parse_units("mlp.1, block.3,attn.0,block.3", 4)
    assert str(Unit("attn", 2)) == "attn.2"
    with pytest.raises(InputError, match="Did you mean: block"):
        parse_units("blok.1", 4)
    with pytest.raises(InputError, match="out of range"):
        parse_units("block.4", 4)
    with pytest.raises(InputError, match="out of range"):
        parse_units("attn.-1", 4)
    with pytest.raises(InputError, match="expected KIND.INDEX"):
        parse_units("block3", 4)
    assert [str(u) for u in all_units(2, ["attn", "mlp"])] == ["attn.0", "mlp.0", "attn.1", "mlp.1"]


def _ids(n: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (batch, n), generator=g)


@torch.no_grad()
def test_mask_restores_bitwise_and_changes_output(family: str) -> None:
    model = tiny_model(family)
    ids = _ids()
    before = model(ids).logits
    modules_before = [id(m) for m in model.modules()]
    with mask_units(model, ["attn.1", "mlp.2"]):
        masked = model(ids).logits
    after = model(ids).logits
    assert torch.equal(before, after)
    assert [id(m) for m in model.modules()] == modules_before
    assert not torch.allclose(before, masked, atol=1e-3)


@torch.no_grad()
def test_mask_restores_after_an_exception(family: str) -> None:
    model = tiny_model(family)
    ids = _ids()
    before = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"), mask_units(model, ["block.0"]):
        raise RuntimeError("boom")
    assert torch.equal(model(ids).logits, before)


@torch.no_grad()
def test_masked_block_is_identity(family: str) -> None:
    model = tiny_model(family)
    ids = _ids()
    with mask_units(model, ["block.1"]):
        hs = model(ids, output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of layer i; the last one has the final norm applied.
    assert torch.equal(hs[2], hs[1])
    assert not torch.equal(hs[3], hs[2])


@torch.no_grad()
def test_masked_attention_leaves_exactly_the_mlp_path(family: str) -> None:
    """With attn.i masked, layer i computes h + post(mlp(pre(h))) in every family."""
    model = tiny_model(family)
    layout = ModelLayout.of(model)
    ids = _ids()
    with mask_units(model, ["attn.1"]):
        hs = model(ids, output_hidden_states=True).hidden_states
    layer = layout.layers[1]
    mlp = layout.spec.mlp
    x = hs[1]
    for name in mlp.pre_norms:
        x = get_submodule(layer, name)(x)
    x = get_submodule(layer, mlp.module)(x)
    for name in mlp.post_norms:
        x = get_submodule(layer, name)(x)
    torch.testing.assert_close(hs[2], hs[1] + x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("masked_layer", [0, N_LAYERS // 2])
@torch.no_grad()
def test_chunked_prefill_matches_one_shot(family: str, masked_layer: int) -> None:
    model = tiny_model(family)
    ids = _ids(n=14, batch=1)
    with mask_units(model, [f"attn.{masked_layer}"]):
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :9], cache=cache, use_cache=True)
        second = model(ids[:, 9:], cache=first.past_key_values, use_cache=True)
        assert second.past_key_values.get_seq_length() == 14
        chunked = torch.cat([first.logits, second.logits], dim=1)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_with_cache_matches_without(family: str) -> None:
    model = tiny_model(family)
    ids = _ids(n=6, batch=1)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with mask_units(model, ["attn.0", "block.2"]):
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (1, 14)
    assert torch.equal(cached, uncached)


def test_mask_rejects_out_of_range(family: str) -> None:
    model = tiny_model(family)
    with pytest.raises(InputError, match="out of range"), mask_units(model, [Unit("mlp", N_LAYERS)]):
        pass


@torch.no_grad()
def test_deepcopy_of_a_model_with_emulators_feeds_its_own_slots(family: str) -> None:
    model = tiny_model(family)
    ids = _ids()
    torch.manual_seed(1)
    stand_ins = {Unit("mlp", 1): nn.Linear(32, 32), Unit("block", 2): nn.Linear(32, 32), Unit("attn", 3): None}
    handle = swap_units_(ModelLayout.of(model), stand_ins, placeholder_cache=False)
    expected = model(ids).logits
    twin = copy.deepcopy(model)
    handle.remove()
    # The copy's hooks must hand the stream to the copy's slots, not to the original's.
    assert torch.equal(twin(ids).logits, expected)
    assert not torch.equal(model(ids).logits, expected)
