"""Family data files: parsing, matching, extension through DEPTHPRUNE_ARCH_PATH."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAMILIES, tiny_model

from depthprune.architectures import _BUILTIN_DIR, check_model, parse_spec, spec_for_config, supported_families
from depthprune.errors import UnsupportedArchitectureError


def test_every_family_has_a_file_and_a_tiny_model() -> None:
    assert supported_families() == FAMILIES
    for fam in FAMILIES:
        model = tiny_model(fam)
        spec = spec_for_config(model.config)
        assert spec.family == fam
        check_model(model, spec)


def test_match_falls_back_to_model_type() -> None:
    class Cfg:
        architectures = ["SomethingNew"]
        model_type = "qwen3"

    assert spec_for_config(Cfg()).family == "qwen3"


def test_unknown_and_missing_keys_are_refused() -> None:
    data = json.loads((_BUILTIN_DIR / "llama.json").read_text())
    with pytest.raises(UnsupportedArchitectureError, match="unknown keys \\['layer'\\]"):
        parse_spec({**data, "layer": "x"})
    with pytest.raises(UnsupportedArchitectureError, match="missing keys \\['mlp'\\]"):
        parse_spec({k: v for k, v in data.items() if k != "mlp"})


def test_extra_folder_adds_a_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.loads((_BUILTIN_DIR / "llama.json").read_text())
    data.update(family="myllama", architectures=["MyLlamaForCausalLM"], model_types=["myllama"])
    (tmp_path / "myllama.json").write_text(json.dumps(data))
    monkeypatch.setenv("DEPTHPRUNE_ARCH_PATH", str(tmp_path))

    class Cfg:
        architectures = ["MyLlamaForCausalLM"]
        model_type = "myllama"

    assert spec_for_config(Cfg()).family == "myllama"
    assert "myllama" in supported_families()


def test_spec_that_does_not_fit_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.loads((_BUILTIN_DIR / "llama.json").read_text())
    data["attn"]["module"] = "attention"
    (tmp_path / "llama.json").write_text(json.dumps(data))
    monkeypatch.setenv("DEPTHPRUNE_ARCH_PATH", str(tmp_path))
    model = tiny_model("llama")
    with pytest.raises(UnsupportedArchitectureError, match="no submodule 'attention'"):
        check_model(model, spec_for_config(model.config))
    gpt2 = tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UnsupportedArchitectureError, match="scale_attn_by_inverse_layer_idx"):
        check_model(gpt2, spec_for_config(gpt2.config))
