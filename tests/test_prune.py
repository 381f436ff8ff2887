"""Physical block removal, the standard export, and the prune CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, N_LAYERS, tiny_model
from safetensors.torch import load_file

from depthprune.cli import main
from depthprune.errors import InputError
from depthprune.export import read_manifest
from depthprune.prune import prune_
from depthprune.units import ModelLayout, mask_units

REMOVE = "block.1,block.2"
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 31]])

# Loads every export with plain transformers, in a process that never imports depthprune,
# and saves its logits and a cached greedy continuation.
_PLAIN_LOAD = r"""
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
out, ids = {}, torch.tensor(%s)
for fam, path in zip(sys.argv[1::2], sys.argv[2::2]):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out[fam + ".logits"] = model(ids).logits.contiguous()
        out[fam + ".gen"] = model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
        out[fam + ".nogen"] = model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
assert "depthprune" not in sys.modules
save_file(out, sys.argv[0].replace(".py", ".safetensors"))
""" % (IDS.tolist(),)


def test_prune_updates_layers_config_and_layer_idx(family: str) -> None:
    model = tiny_model(family)
    result = prune_(model, REMOVE.split(","))
    assert result.n_layers_before == N_LAYERS and result.n_layers_after == N_LAYERS - 2
    assert result.index_map == {0: 0, 1: None, 2: None, 3: 1}
    assert result.params_after < result.params_before
    assert model.config.num_hidden_layers == N_LAYERS - 2
    for new_index, layer in enumerate(ModelLayout.of(model).layers):
        idx = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idx == {new_index}
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == N_LAYERS - 2


def test_prune_refuses_sublayers_and_everything() -> None:
    model = tiny_model("llama")
    with pytest.raises(InputError, match="sublayers"):
        prune_(model, ["attn.1"])
    with pytest.raises(InputError, match="every block"):
        prune_(model, [f"block.{i}" for i in range(N_LAYERS)])
    assert len(model.model.layers) == N_LAYERS


@pytest.mark.slow
def test_export_loads_with_plain_transformers(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    expected, args = {}, []
    for fam in FAMILIES:
        out = tmp_path / f"{fam}-pruned"
        assert main(["prune", str(tiny_model_dirs[fam]), "--remove", REMOVE, "-o", str(out)]) == 0
        manifest = read_manifest(out)
        assert manifest["removed"] == ["block.1", "block.2"]
        assert manifest["index_map"]["layers"] == {"0": 0, "1": None, "2": None, "3": 1}
        assert manifest["source"]["model"] == str(tiny_model_dirs[fam])
        assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
        assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
        config = json.loads((out / "config.json").read_text())
        assert config.get("num_hidden_layers", config.get("n_layer")) == N_LAYERS - 2
        model = tiny_model(fam)
        with torch.no_grad(), mask_units(model, REMOVE.split(",")):
            expected[fam] = model(IDS).logits
        args += [fam, str(out)]
    script = tmp_path / "plain_load.py"
    script.write_text(_PLAIN_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(script), *args], check=True, env=env, capture_output=True, cwd=tmp_path)
    got = load_file(tmp_path / "plain_load.safetensors")
    for fam in FAMILIES:
        torch.testing.assert_close(got[fam + ".logits"], expected[fam], atol=1e-5, rtol=0, msg=fam)
        assert got[fam + ".gen"].shape == (1, 12)
        assert torch.equal(got[fam + ".gen"], got[fam + ".nogen"]), fam


def test_source_folder_is_never_written(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_model_dirs["llama"]
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    assert main(["prune", str(src), "--remove", "block.0", "-o", str(tmp_path / "out")]) == 0
    assert main(["prune", str(src), "--remove", "block.0", "-o", str(src), "--force"]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


def test_existing_output_needs_force(tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", str(tiny_model_dirs["llama"]), "--remove", "block.0", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["prune", str(tiny_model_dirs["llama"]), "--remove", "block.0", "-o", str(out), "--force"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_dry_run_writes_nothing(tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dirs["gpt2"]), "--remove", "block.3", "-o", str(out), "--dry-run"]) == 0
    assert "would remove block.3: 4 -> 3 layers" in capsys.readouterr().out
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
