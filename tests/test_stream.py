"""The residual stream of each path, as every consumer sees it, against a hand decomposition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, tiny_model
from torch import nn

import depthprune.architectures
from depthprune.architectures import get_submodule, spec_for_config
from depthprune.data import TokenBatches, pack
from depthprune.recover import collect_updates, emulate
from depthprune.score import ScoreConfig, score
from depthprune.stream import hidden_arg, hidden_of, with_hidden_arg
from depthprune.units import UNIT_KINDS, ModelLayout, Unit

LAYER = 1


def _tokens(n: int = 4, t: int = 12) -> TokenBatches:
    g = torch.Generator().manual_seed(0)
    return pack(torch.randint(3, 300, (n * t,), generator=g).tolist(), n, t)


def _apply(layer: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    for name in names:
        x = get_submodule(layer, name)(x)
    return x


@torch.no_grad()
def _decompose(model: nn.Module, ids: torch.Tensor, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Unit kind -> (stream entering it, its update), computed by hand from the family's file.

    Only the attention module's raw output is taken from a hook (it needs the layer's
    positions and masks); its post-norms, the MLP path and the residual adds are applied here.
    """
    spec = spec_for_config(model.config)
    layer = ModelLayout.of(model).layers[i]
    seen: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _a: tuple, out: object) -> None:
        seen["attn"] = out[0] if isinstance(out, tuple) else out  # type: ignore[assignment]

    handle = get_submodule(layer, spec.attn.module).register_forward_hook(keep)
    try:
        hs = model(ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    h_in, h_out = hs[i], hs[i + 1]  # input and output of layer i (i + 1 < n_layers: no final norm)
    u_attn = _apply(layer, spec.attn.post_norms, seen["attn"])
    h_mid = h_in if spec.is_parallel(model.config) else h_in + u_attn
    mlp = get_submodule(layer, spec.mlp.module)
    u_mlp = _apply(layer, spec.mlp.post_norms, mlp(_apply(layer, spec.mlp.pre_norms, h_mid)))
    torch.testing.assert_close(h_in + u_attn + u_mlp, h_out, rtol=1e-5, atol=1e-5)  # the decomposition closes
    return {"block": (h_in, h_out - h_in), "attn": (h_in, u_attn), "mlp": (h_mid, u_mlp)}


def _static_values(h: torch.Tensor, dh: torch.Tensor) -> dict[str, float]:
    x, d = h.double().reshape(-1, h.shape[-1]), dh.double().reshape(-1, dh.shape[-1])
    return {
        "cosine": float((1 - F.cosine_similarity(x, x + d, dim=-1)).mean()),
        "rel_l1": float((d.abs().sum(-1) / x.abs().sum(-1)).mean()),
        "rel_l2": float((d.norm(dim=-1) / x.norm(dim=-1)).mean()),
    }


class _Replay(nn.Module):
    """An emulator that records its input and returns a given update ``(B, T, D)``."""

    def __init__(self, update: torch.Tensor) -> None:
        super().__init__()
        self.update = update
        self.seen: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.seen.append(h)
        return self.update


@torch.no_grad()
def _check_consumers(model: nn.Module, kind: str) -> None:
    data = _tokens()
    unit = Unit(kind, LAYER)
    h, dh = _decompose(model, data.input_ids, LAYER)[kind]

    # 1. static scores (score/static.py)
    result = score(model, data, ScoreConfig(metrics=("cosine", "rel_l1", "rel_l2"), units=(kind,), show_progress=False))
    for metric, expected in _static_values(h, dh).items():
        assert result.scores[metric][str(unit)] == pytest.approx(expected, rel=1e-5, abs=1e-7), metric

    # 2. emulator statistics (recover/emulate.py)
    stats = collect_updates(model, data, [unit], show_progress=False)[unit]
    mu, b, cov_hh, cov_hd = stats.moments()
    x, d = h.double().reshape(-1, h.shape[-1]), dh.double().reshape(-1, dh.shape[-1])
    xc, dc = x - x.mean(0), d - d.mean(0)
    tol = dict(rtol=0, atol=1e-6 * max(float(x.abs().max()), 1.0))
    torch.testing.assert_close(mu, x.mean(0), **tol)
    torch.testing.assert_close(b, d.mean(0), **tol)
    torch.testing.assert_close(cov_hh, xc.T @ xc / len(x), **tol)
    torch.testing.assert_close(cov_hd, xc.T @ dc / len(x), **tol)

    # 3. installed emulator (recover/install.py): it reads h, and writing dh back where the
    # path wrote it gives the unpruned model's logits
    full = model(data.input_ids).logits
    replay = _Replay(dh)
    with emulate(model, {unit: replay}):
        replayed = model(data.input_ids).logits
    assert len(replay.seen) == 1
    torch.testing.assert_close(replay.seen[0], h, rtol=0, atol=1e-6)
    torch.testing.assert_close(replayed, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", UNIT_KINDS)
def test_scores_fit_and_install_agree_with_the_hand_decomposition(family: str, kind: str) -> None:
    _check_consumers(tiny_model(family), kind)


@pytest.mark.parametrize("kind", UNIT_KINDS)
def test_consumers_agree_in_a_family_without_an_mlp_pre_norm(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MLP path's stream is then tapped at the MLP module's own input."""
    data = json.loads((Path(depthprune.architectures.__file__).parent / "llama.json").read_text())
    data["mlp"]["pre_norms"] = []
    (tmp_path / "llama.json").write_text(json.dumps(data))
    monkeypatch.setenv("DEPTHPRUNE_ARCH_PATH", str(tmp_path))
    model = tiny_model("llama")
    for layer in ModelLayout.of(model).layers:
        layer.post_attention_layernorm = nn.Identity()  # the model the file describes
    assert spec_for_config(model.config).mlp.pre_norms == ()
    _check_consumers(model, kind)


def test_hidden_argument_helpers() -> None:
    x, y = torch.zeros(1), torch.ones(1)
    assert hidden_arg((x, 3), {}) is x and hidden_arg((), {"hidden_states": x, "cache": None}) is x
    assert with_hidden_arg((x, 3), {"a": 1}, y) == ((y, 3), {"a": 1})
    args, kwargs = with_hidden_arg((), {"hidden_states": x, "a": 1}, y)
    assert args == () and kwargs["hidden_states"] is y and kwargs["a"] == 1
    assert hidden_of((x, None)) is x and hidden_of(x) is x
