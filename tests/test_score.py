"""Static and leave-one-out scores against slow references, invariances and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import N_LAYERS, tiny_model

from depthprune.data import TokenBatches, load_calibration, pack
from depthprune.errors import InputError
from depthprune.score import ScoreConfig, score
from depthprune.score.static import NonFiniteError
from depthprune.stream import hidden_arg
from depthprune.units import ModelLayout, Unit, all_units, mask_units

STATIC = ("cosine", "angular", "rel_l1", "rel_l2")


def _random_batches(n: int = 4, t: int = 10, seed: int = 0) -> TokenBatches:
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(3, 300, (n * t * 2,), generator=g).tolist()
    return pack(stream, n, t, seed=seed)


@torch.no_grad()
def _layer_io(model: torch.nn.Module, ids: torch.Tensor, layer: int, masked: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of one decoder layer with ``masked`` units disabled."""
    layers = ModelLayout.of(model).layers
    seen: dict[str, torch.Tensor] = {}

    def pre(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["in"] = hidden_arg(args, kwargs)

    def post(_m: torch.nn.Module, _a: tuple, out: object) -> None:
        seen["out"] = out[0] if isinstance(out, tuple) else out  # type: ignore[index]

    h1 = layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    h2 = layers[layer].register_forward_hook(post)
    try:
        with mask_units(model, masked):
            model(ids)
    finally:
        h1.remove()
        h2.remove()
    return seen["in"], seen["out"]


def _reference_values(h_in: torch.Tensor, h_out: torch.Tensor) -> dict[str, float]:
    x, y = h_in.double().reshape(-1, h_in.shape[-1]), h_out.double().reshape(-1, h_out.shape[-1])
    d = y - x
    cos = F.cosine_similarity(x, y, dim=-1)
    return {
        "cosine": float((1 - cos).mean()),
        "angular": float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()),
        "rel_l1": float((d.abs().sum(-1) / x.abs().sum(-1)).mean()),
        "rel_l2": float((d.norm(dim=-1) / x.norm(dim=-1)).mean()),
    }


def _reference(model: torch.nn.Module, ids: torch.Tensor, unit: Unit) -> dict[str, float]:
    """Slow reference: isolate each unit's input and output by masking the other sublayer."""
    i = unit.index
    parallel = ModelLayout.of(model).parallel
    h_in, h_out = _layer_io(model, ids, i, [])
    if unit.kind == "attn":
        h_out = _layer_io(model, ids, i, [f"mlp.{i}"])[1]
    elif unit.kind == "mlp":
        if parallel:
            h_out = _layer_io(model, ids, i, [f"attn.{i}"])[1]
        else:
            h_in = _layer_io(model, ids, i, [f"mlp.{i}"])[1]
    return _reference_values(h_in, h_out)


def test_one_pass_equals_masked_reference(family: str) -> None:
    model = tiny_model(family)
    data = _random_batches()
    result = score(model, data, ScoreConfig(metrics=STATIC, batch_size=3, show_progress=False))
    for unit in all_units(N_LAYERS):
        ref = _reference(model, data.input_ids, unit)
        for metric in STATIC:
            got = result.scores[metric][str(unit)]
            assert got == pytest.approx(ref[metric], rel=1e-5, abs=1e-7), (family, unit, metric)
    assert set(result.stderr["cosine"]) == {str(u) for u in all_units(N_LAYERS)}


def test_span_metric_and_last_token_reference() -> None:
    model = tiny_model("llama")
    data = _random_batches()
    result = score(model, data, ScoreConfig(metrics=("angular_span", "cosine"), units=("block",), span=2, last_token_only=True, show_progress=False))
    assert sorted(result.scores["angular_span"]) == ["block.0", "block.1", "block.2"]
    for start in range(N_LAYERS - 1):
        h_in = _layer_io(model, data.input_ids, start, [])[0][:, -1]
        h_out = _layer_io(model, data.input_ids, start + 1, [])[1][:, -1]
        ref = _reference_values(h_in, h_out)["angular"]
        assert result.scores["angular_span"][f"block.{start}"] == pytest.approx(ref, rel=1e-5)
        ref_cos = _reference_values(*[t[:, -1] for t in _layer_io(model, data.input_ids, start, [])])["cosine"]
        assert result.scores["cosine"][f"block.{start}"] == pytest.approx(ref_cos, rel=1e-5)
    assert result.definitions["angular_span"]["span"] == 2


def test_padding_never_counts() -> None:
    model = tiny_model("qwen2")
    data = _random_batches(n=2, t=10)
    padded_ids = torch.cat([data.input_ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([data.attention_mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded = TokenBatches(padded_ids, padded_mask, data.info)
    for last in (False, True):
        cfg = ScoreConfig(metrics=(*STATIC, "loo_loss", "loo_kl"), last_token_only=last, show_progress=False)
        a, b = score(model, data, cfg), score(model, padded, cfg)
        for metric in a.scores:
            for unit, value in a.scores[metric].items():
                assert b.scores[metric][unit] == pytest.approx(value, rel=1e-5, abs=1e-7), (metric, unit, last)


def test_batch_size_invariance_and_determinism(stories_dir: Path, shared: Path) -> None:
    from depthprune.loading import load_model

    lm = load_model(str(stories_dir))
    text = shared / "data" / "tinystories" / "tinystories_sample.txt"
    data = load_calibration(text, lm.tokenizer, n_sequences=6, seq_len=64, seed=3)
    again = load_calibration(text, lm.tokenizer, n_sequences=6, seq_len=64, seed=3)
    other = load_calibration(text, lm.tokenizer, n_sequences=6, seq_len=64, seed=4)
    assert data.info.sha256 == again.info.sha256 and torch.equal(data.input_ids, again.input_ids)
    assert other.info.sha256 != data.info.sha256
    assert data.input_ids.shape == (6, 64) and bool((data.input_ids[:, 0] == 1).all())
    cfg = dict(metrics=(*STATIC, "loo_loss", "loo_kl"), show_progress=False)
    one = score(lm.model, data, ScoreConfig(batch_size=1, **cfg))
    four = score(lm.model, data, ScoreConfig(batch_size=4, **cfg))
    for metric, values in one.scores.items():
        for unit, value in values.items():
            assert four.scores[metric][unit] == pytest.approx(value, rel=1e-5, abs=1e-7), (metric, unit)
    assert score(lm.model, data, ScoreConfig(batch_size=4, **cfg)).scores == four.scores


def test_leave_one_out_equals_direct_masked_evaluation(stories_dir: Path, shared: Path) -> None:
    from depthprune.loading import load_model

    lm = load_model(str(stories_dir))
    data = load_calibration(shared / "data" / "tinystories" / "tinystories_sample.txt", lm.tokenizer, n_sequences=4, seq_len=96)
    result = score(lm.model, data, ScoreConfig(metrics=("loo_loss", "loo_kl"), batch_size=2, show_progress=False))
    ids = data.input_ids
    with torch.no_grad():
        full = lm.model(ids, labels=ids)
        logp_full = F.log_softmax(full.logits[:, :-1].double(), -1)
        for unit in all_units(5):
            with mask_units(lm.model, [unit]):
                masked = lm.model(ids, labels=ids)
            expected = float(masked.loss - full.loss)
            assert result.scores["loo_loss"][str(unit)] == pytest.approx(expected, rel=1e-4, abs=1e-6), unit
            logp = F.log_softmax(masked.logits[:, :-1].double(), -1)
            kl = float((logp_full.exp() * (logp_full - logp)).sum(-1).mean())
            assert result.scores["loo_kl"][str(unit)] == pytest.approx(kl, rel=1e-4, abs=1e-6), unit
    # Prefix reuse: each unit costs only the layers from its own onwards.
    assert result.cost["loo_layer_evals"] == 4 * (5 + sum(2 * (5 - i) + (5 - i) for i in range(5)))


def test_bad_inputs(tmp_path: Path) -> None:
    from conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="holds no text"):
        load_calibration(empty, tok, 2, 16)
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    with pytest.raises(InputError, match="shorter than one sequence"):
        load_calibration(short, tok, 2, 16)
    with pytest.raises(InputError, match="does not exist"):
        load_calibration(tmp_path / "missing.txt", tok, 2, 16)
    with pytest.raises(InputError, match="Did you mean: cosine"):
        ScoreConfig(metrics=("cosin",))
    with pytest.raises(InputError, match="Did you mean: attn"):
        ScoreConfig(units=("atn",))
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite activations at block.2"):
        score(model, _random_batches(), ScoreConfig(show_progress=False))
    with pytest.raises(NonFiniteError, match="non-finite"):
        score(model, _random_batches(), ScoreConfig(metrics=("loo_loss",), units=("attn",), show_progress=False))
