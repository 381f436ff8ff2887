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

from depthprune import api
from depthprune.api import PruneConfig
from depthprune.cli import main
from depthprune.errors import InputError
from depthprune.export import read_manifest
from depthprune.loading import DTYPES, LoadConfig, as_load_config
from depthprune.prune import PruneResult, prune_
from depthprune.units import ModelLayout, Unit, mask_units

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


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"model": ""}, "model '' is not a model reference"),
        ({"dtype": "float61"}, "unknown dtype 'float61'. Did you mean: float16"),
        ({"device": "gpu"}, "device 'gpu' is not a torch device"),
        ({"trust_remote_code": "yes"}, "trust_remote_code 'yes' is invalid"),
        ({"attn_implementation": ""}, "attn_implementation '' is invalid"),
    ],
)
def test_load_config_refuses_bad_values_in_one_line(kwargs: dict, needle: str) -> None:
    with pytest.raises(InputError) as err:
        LoadConfig(**{"model": "org/name", **kwargs})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_load_model_shorthand_is_a_load_config(tmp_path: Path) -> None:
    assert as_load_config("org/name", dtype="float32") == LoadConfig("org/name", dtype="float32")
    assert as_load_config(tmp_path).model == str(tmp_path)
    assert as_load_config(LoadConfig("org/name", dtype="float16"), device="meta") == LoadConfig("org/name", "float16", "meta")
    with pytest.raises(TypeError, match="dtyp"):
        as_load_config("org/name", dtyp="float32")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"remove": "block.1", "plan": "plan.json"}, "both --remove and --plan were given"),
        ({}, "nothing to remove"),
        ({"remove": "blok.1"}, "unknown unit kind 'blok'"),
        ({"remove": "block.1", "recover": "lowrank"}, "unknown --recover value 'lowrank'"),
        ({"remove": "block.1", "export_format": "onnx"}, "unknown export format 'onnx'"),
        ({"remove": "block.1", "n_samples": 0}, "n_samples 0 is invalid"),
        ({"remove": "block.1", "seq_len": 1}, "seq_len 1 is invalid"),
        ({"remove": "block.1", "seed": -1}, "seed -1 is invalid"),
        ({"remove": "block.1", "text_field": ""}, "text_field '' is invalid"),
        ({"remove": "block.1", "ridge": -1.0}, "ridge -1.0 is invalid"),
        ({"remove": "block.1", "batch_size": 0}, "batch size 0 is invalid"),
        ({"remove": "block.1", "dry_run": "no"}, "dry_run 'no' is invalid"),
    ],
)
def test_prune_config_refuses_bad_values_in_one_line(kwargs: dict, needle: str) -> None:
    with pytest.raises(InputError) as err:
        PruneConfig(out="out", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_prune_config_parses_units_and_paths_once() -> None:
    config = PruneConfig(out="out", remove="block.3, attn.1")
    assert config.remove == (Unit("attn", 1), Unit("block", 3)) and config.out == Path("out")
    with pytest.raises(InputError, match="block.3 is given twice"):
        PruneConfig(out="out", remove="block.3, attn.1,block.3")
    assert PruneConfig(out="out", remove=[Unit("mlp", 2)]).remove == (Unit("mlp", 2),)
    assert PruneConfig(out="out", plan="plan.json").plan == Path("plan.json")


def test_model_flags_offer_every_dtype() -> None:
    from depthprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        dests = {a.dest: a for a in parser._actions}
        if "dtype" in dests and "device" in dests:  # a command that loads a model (converters choose an output dtype)
            assert dests["dtype"].choices == list(DTYPES), name


def test_prune_cli_maps_every_flag_to_the_configs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[tuple[LoadConfig, PruneConfig]] = []

    def fake_prune_model(load: LoadConfig, prune: PruneConfig) -> PruneResult:
        seen.append((load, prune))
        return PruneResult(removed=(Unit("block", 1),), n_layers_before=4, n_layers_after=3, params_before=10, params_after=8)

    monkeypatch.setattr(api, "prune_model", fake_prune_model)
    argv = ["prune", "org/name", "--dtype", "float16", "--device", "meta", "--trust-remote-code", "--plan", "p.json"]
    argv += ["--recover", "lowrank:4", "--data", "d.txt", "--samples", "3", "--seq-len", "16", "--seed", "5"]
    argv += ["--text-field", "body", "--ridge", "0.5", "--batch-size", "2", "--format", "nemotron-nas"]
    argv += ["-o", "out", "--force", "--dry-run", "-q"]
    assert main(argv) == 0
    assert seen == [
        (
            LoadConfig("org/name", dtype="float16", device="meta", trust_remote_code=True),
            PruneConfig(
                out="out", plan="p.json", recover="lowrank:4", data="d.txt", n_samples=3, seq_len=16, seed=5,
                text_field="body", ridge=0.5, batch_size=2, export_format="nemotron-nas", force=True, dry_run=True,
                show_progress=False,
            ),
        )
    ]
    assert "would remove block.1: 4 -> 3 layers" in capsys.readouterr().out
