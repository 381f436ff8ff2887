"""Family data files: parsing, matching, extension through DEPTHPRUNE_ARCH_PATH."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAMILIES, tiny_model

from depthprune.architectures import (
    _BUILTIN_DIR,
    check_model,
    match_spec,
    num_layers,
    parse_spec,
    spec_for_config,
    supported_families,
)
from depthprune.data import context_length
from depthprune.errors import UnsupportedArchitectureError


def test_every_family_has_a_file_and_a_tiny_model() -> None:
    assert supported_families() == FAMILIES
    for fam in FAMILIES:
        model = tiny_model(fam)
        spec = spec_for_config(model.config)
        assert spec.family == fam
        check_model(model, spec)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_keys_read_the_layer_count_and_the_context(family: str) -> None:
    spec = spec_for_config(tiny_model(family).config)
    assert spec.max_positions_key is not None
    # A value other than the fixtures' 128 shows that the file names the key the model reads.
    model = tiny_model(family, **{spec.max_positions_key: 96, spec.num_layers_key: 3})
    assert context_length(model) == context_length(model.config) == 96
    assert num_layers(model.config) == len(model.get_submodule(spec.layers)) == 3


def test_context_of_an_unknown_family_is_unknown() -> None:
    class Cfg:
        architectures = ("SomethingNew",)
        model_type = "new"
        max_position_embeddings = 4096

    assert match_spec(Cfg()) is None and context_length(Cfg()) is None
    with pytest.raises(UnsupportedArchitectureError, match="supported families"):
        num_layers(Cfg())


def test_nemotron_nas_is_declared_by_the_llama_layout_families_only() -> None:
    allowed = sorted(fam for fam in FAMILIES if spec_for_config(tiny_model(fam).config).nemotron_nas)
    assert allowed == ["llama", "mistral"]
    data = json.loads((_BUILTIN_DIR / "gpt2.json").read_text())
    assert "nemotron_nas" not in data and parse_spec(data).nemotron_nas is False
    with pytest.raises(UnsupportedArchitectureError, match="nemotron_nas is 'yes'; expected true or false"):
        parse_spec({**data, "nemotron_nas": "yes"})


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
    with pytest.raises(UnsupportedArchitectureError, match="unknown config keys \\['max_position'\\]"):
        parse_spec({**data, "config": {**data["config"], "max_position": "n_positions"}})


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
