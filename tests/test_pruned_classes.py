"""Exports with removed sublayers and emulators: round trips, Auto classes, KV cache, nemotron-nas."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAMILIES, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import depthprune
from depthprune.api import PruneConfig, prune_model
from depthprune.data import context_length, load_calibration
from depthprune.errors import InputError, ModelLoadError
from depthprune.export import export, read_manifest
from depthprune.loading import LoadConfig, load_model
from depthprune.pruned_classes import (
    depthprune_info,
    is_depthpruned,
    spec_of,
    to_depthpruned_,
)
from depthprune.recover import (
    BiasEmulator,
    EmulationConfig,
    emulate,
    fit_emulators,
    kv_cache_bytes,
)
from depthprune.units import Unit, mask_units

PLAN = {"attn.1": "none", "mlp.2": "bias", "block.0": "lowrank:4", "block.3": "none"}
CALIB = dict(n_samples=6, seq_len=16)
IDS = torch.tensor([[1, 5, 9, 40, 41, 42, 7, 8, 100, 200, 300, 12], [1, 50, 60, 70, 80, 90, 91, 92, 93, 94, 95, 96]])


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("the quick brown fox jumps over the lazy dog and the cat sat on the mat. " * 80)
    return path


def _plan_file(folder: Path, entries: dict[str, str]) -> Path:
    path = folder / "plan.json"
    path.write_text(json.dumps({"remove": [{"unit": u, "replace": r} for u, r in entries.items()]}))
    return path


@torch.no_grad()
def _reference_logits(model_dir: Path, text: Path, entries: dict[str, str]) -> torch.Tensor:
    """Logits of the unpruned model with the plan emulated in memory, fitted as prune_model fits."""
    loaded = load_model(str(model_dir), dtype="float32")
    calib = load_calibration(
        text, loaded.tokenizer, n_sequences=CALIB["n_samples"], seq_len=CALIB["seq_len"], max_context=context_length(loaded.model)
    )
    table = {Unit.parse(u): r for u, r in entries.items()}
    fitted = fit_emulators(loaded.model, calib, table, EmulationConfig(show_progress=False))
    with emulate(loaded.model, fitted):
        return loaded.model(IDS).logits


@pytest.fixture(scope="module")
def exported(tiny_model_dirs: dict[str, Path], text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family pruned with the mixed plan through prune_model."""
    root = tmp_path_factory.mktemp("exports")
    plan = _plan_file(root, PLAN)
    outs = {}
    for family in FAMILIES:
        out = root / family
        # Emulators kept as modules, fitted on every sequence: this is the depthprune-format round trip.
        config = PruneConfig(plan=plan, out=out, data=text, show_progress=False, fold=False, heldout=0.0, **CALIB)
        prune_model(LoadConfig(str(tiny_model_dirs[family]), dtype="float32"), config)
        outs[family] = out
    return outs


def test_export_round_trips_for_every_family(
    family: str, exported: dict[str, Path], tiny_model_dirs: dict[str, Path], text: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = exported[family]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"depthprune_{family}"
    assert config["architectures"][0].startswith("DepthPruned")
    info = config["depthprune"]
    assert info["family"] == family and info["n_layers_source"] == 4
    assert {(e["unit"], e["layer"], e["replace"]) for e in info["units"]} == {
        ("block.0", 0, "lowrank:4"),
        ("attn.1", 1, "none"),
        ("mlp.2", 2, "bias"),
    }
    manifest = read_manifest(out)
    assert manifest["removed"] == ["attn.1", "block.0", "block.3", "mlp.2"]
    assert manifest["emulated"] == {"mlp.2": "bias", "block.0": "lowrank:4"}
    assert manifest["recover"]["calibration"]["n_sequences"] == CALIB["n_samples"]
    by_load = depthprune.load(out)
    spec = spec_of(by_load)
    assert not (out / "model.safetensors").exists() and "depthprune.load" in (out / "README.md").read_text()
    with safe_open(out / "model.depthprune.safetensors", "pt") as f:
        names = set(f.keys())
    assert {f"{spec.layers}.0.{spec.attn.module}.emulator.{p}" for p in ("A", "B", "mu", "bias")} <= names
    assert {f"{spec.layers}.2.{spec.mlp.module}.emulator.bias"} <= names
    assert not any(n.startswith(f"{spec.layers}.1.{spec.attn.module}.") for n in names)  # removed attention

    ref = _reference_logits(tiny_model_dirs[family], text, PLAN)
    by_auto = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(by_load).__name__ == config["architectures"][0] == type(by_auto).__name__
    with torch.no_grad():
        torch.testing.assert_close(by_load(IDS).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(by_auto(IDS).logits, ref, rtol=0, atol=1e-5)


def test_plain_transformers_refuses_export_and_auto_works_after_import(exported: dict[str, Path], tmp_path: Path) -> None:
    out = exported["llama"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for loader, needle in (("AutoModelForCausalLM", "depthprune_llama"), ("LlamaForCausalLM", "no file named model.safetensors")):
        # Neither the Auto class nor the family's own class may load the unpruned architecture.
        plain = (
            "import sys\n"
            f"from transformers import {loader}\n"
            f"try:\n    {loader}.from_pretrained({str(out)!r})\n"
            "except Exception as exc:\n    print('REFUSED', type(exc).__name__, str(exc).splitlines()[0]); sys.exit(0)\n"
            "print('LOADED'); sys.exit(1)\n"
        )
        run = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "REFUSED" in run.stdout and needle in run.stdout, run.stdout

    # In a fresh interpreter, importing depthprune first is enough for the Auto classes.
    ref = tmp_path / "ref.safetensors"
    with torch.no_grad():
        save_file({"logits": depthprune.load(out)(IDS).logits.contiguous(), "ids": IDS}, ref)
    after = (
        "import depthprune, sys\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoModelForCausalLM\n"
        f"ref = load_file({str(ref)!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        "diff = (model(ref['ids']).logits - ref['logits']).abs().max().item()\n"
        "print(type(model).__name__, diff); sys.exit(0 if diff < 1e-5 else 1)\n"
    )
    run = subprocess.run([sys.executable, "-c", after], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "DepthPrunedLlamaForCausalLM" in run.stdout


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi"])
def test_generate_with_cache_on_attention_removed_export(family: str, tmp_path: Path) -> None:
    from transformers import DynamicCache

    model = tiny_model(family)
    units = [Unit("attn", 0), Unit("attn", 2)]
    ids = IDS[:, :10]
    with torch.no_grad():
        full = model(ids, use_cache=True).cache
        kept_bytes = sum(kv_cache_bytes(SimpleNamespace(layers=[layer])) for i, layer in enumerate(full.layers) if i not in (0, 2))
        with mask_units(model, units):
            placeholder_bytes = kv_cache_bytes(model(ids, use_cache=True).cache)
    to_depthpruned_(model, dict.fromkeys(units))
    export(model, tmp_path / "out")
    loaded = depthprune.load(tmp_path / "out")
    with torch.no_grad():
        out = loaded(ids, use_cache=True)
        cache_bytes = kv_cache_bytes(out.cache)
        assert [type(layer).__name__ for layer in out.cache.layers][0] == "DummyLayer"
        assert cache_bytes == kept_bytes < placeholder_bytes < kv_cache_bytes(full)  # removed layers hold nothing
        cached = loaded.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
        uncached = loaded.generate(ids[:, :5], max_new_tokens=8, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        cache = DynamicCache(config=loaded.config)  # chunked prefill
        chunks = [loaded(ids[:, :4], cache=cache, use_cache=True).logits, loaded(ids[:, 4:], cache=cache, use_cache=True).logits]
        torch.testing.assert_close(torch.cat(chunks, 1), loaded(ids).logits, rtol=0, atol=1e-5)


def test_model_without_any_attention_still_generates(tmp_path: Path) -> None:
    model = tiny_model("llama")
    to_depthpruned_(model, {Unit("attn", i): None for i in range(4)})
    export(model, tmp_path / "out")
    loaded = depthprune.load(tmp_path / "out")
    with torch.no_grad():
        cached = loaded.generate(IDS[:, :5], max_new_tokens=6, do_sample=False)
        assert torch.equal(cached, loaded.generate(IDS[:, :5], max_new_tokens=6, do_sample=False, use_cache=False))


def test_to_depthpruned_counts_and_info() -> None:
    model = tiny_model("qwen2")
    before = sum(p.numel() for p in model.parameters())
    result = to_depthpruned_(model, {Unit("block", 1): None, Unit("mlp", 3): None})
    assert result.n_layers_before == 4 and result.n_layers_after == 3
    assert result.index_map == {0: 0, 1: None, 2: 1, 3: 2}
    assert result.params_before == before > result.params_after
    assert is_depthpruned(model) and spec_of(model).family == "qwen2"
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]  # sliced with the block
    assert depthprune_info(model.config)["units"] == [{"unit": "mlp.3", "layer": 2, "replace": "none"}]
    with pytest.raises(ModelLoadError, match="no valid 'depthprune' entry"):
        depthprune_info(tiny_model("qwen2").config)


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"plan": {"block.1": "bias"}}, ("block.1 -> bias", "--data")),
        ({"remove": "block.1,attn.1"}, ("attn.1", "overlap a removed block")),
        ({"remove": "attn.1", "recover": "lowrank"}, ("--recover value", "lowrank:R")),
        ({"remove": "attn.1", "export_format": "onnx"}, ("unknown export format",)),
        ({"plan": {"attn.1": "bias"}, "data": "TEXT", "export_format": "nemotron-nas"}, ("cannot express emulators", "attn.1 -> bias")),
        ({"remove": "attn.0", "export_format": "nemotron-nas"}, ("first kept layer (attn.0)", "--format gguf")),
        ({"remove": "block.0,attn.1", "export_format": "nemotron-nas"}, ("first kept layer (attn.1)", "--format gguf")),
    ],
)
def test_prune_model_refuses_before_loading(
    kwargs: dict, needles: tuple[str, ...], tiny_model_dirs: dict[str, Path], tmp_path: Path, text: Path
) -> None:
    if isinstance(kwargs.get("plan"), dict):
        kwargs = {**kwargs, "plan": _plan_file(tmp_path, kwargs["plan"])}
    if kwargs.get("data") == "TEXT":
        kwargs = {**kwargs, "data": text}
    with pytest.raises(InputError) as err:
        prune_model(LoadConfig(str(tiny_model_dirs["llama"])), PruneConfig(out=tmp_path / "out", **kwargs))
    for needle in needles:
        assert needle in str(err.value)
    assert not (tmp_path / "out").exists()


def test_prune_model_refuses_a_family_that_nemotron_nas_cannot_express(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = PruneConfig(remove="attn.1", out=tmp_path / "out", export_format="nemotron-nas")
    with pytest.raises(InputError, match="for the llama, mistral families; this model is 'gpt2'"):
        prune_model(LoadConfig(str(tiny_model_dirs["gpt2"])), config)
    assert not (tmp_path / "out").exists()


def _decilm_module(path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("configuration_decilm_test", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_nemotron_nas_export_matches_decilm_semantics(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    # int(2 * ffn_mult * 32 / 3) rounded up to 256 must give the MLP width: 256 does (ffn_mult 12).
    src = tmp_path / "llama256"
    tiny_model("llama", intermediate_size=256).save_pretrained(src)
    out = tmp_path / "nas"
    plan = _plan_file(tmp_path, {"attn.1": "none", "mlp.2": "none", "block.3": "none"})
    prune_model(LoadConfig(str(src), dtype="float32"), PruneConfig(plan=plan, out=out, export_format="nemotron-nas"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    blocks = config["block_configs"]
    assert config["num_hidden_layers"] == len(blocks) == 3
    assert [(b["attention"]["no_op"], b["ffn"]["no_op"]) for b in blocks] == [(False, False), (True, False), (False, True)]
    assert blocks[0]["attention"] == {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 2}
    assert blocks[0]["ffn"] == {"no_op": False, "replace_with_linear": False, "ffn_mult": 12.0, "intermediate_size": 256}
    assert read_manifest(out)["format"] == "nemotron-nas"
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    # DeciLM builds no module (and no norm) for a no-op sublayer, so none may be in the checkpoint.
    assert not any(n.startswith(("model.layers.1.self_attn.", "model.layers.1.input_layernorm")) for n in names)
    assert not any(n.startswith(("model.layers.2.mlp.", "model.layers.2.post_attention_layernorm")) for n in names)
    assert "model.layers.2.input_layernorm.weight" in names and "model.layers.1.post_attention_layernorm.weight" in names

    decilm = _decilm_module(out / "configuration_decilm.py").DeciLMConfig(**config)
    assert decilm.block_configs[1].attention.no_op and decilm.block_configs[2].ffn.no_op
    assert decilm.block_configs[0].ffn.ffn_mult == 12.0

    # DeciLM semantics: a Llama whose no-op sublayers add nothing.
    llama_keys = {k: v for k, v in config.items() if k not in ("block_configs", "auto_map", "model_type", "architectures")}
    reference = LlamaForCausalLM(LlamaConfig(**llama_keys, intermediate_size=256, num_key_value_heads=2)).eval()
    state = {}
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in names:
            state[name] = f.get_tensor(name)
    missing = reference.load_state_dict(state, strict=False).missing_keys
    assert all(".layers.1." in k or ".layers.2." in k for k in missing)
    with torch.no_grad(), mask_units(reference, [Unit("attn", 1), Unit("mlp", 2)]):
        expected = reference(IDS).logits
    pruned = load_model(str(src), dtype="float32").model
    to_depthpruned_(pruned, {Unit("attn", 1): None, Unit("mlp", 2): None, Unit("block", 3): None})
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, expected, rtol=0, atol=1e-5)


def test_nemotron_nas_refuses_other_families_and_emulators(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    to_depthpruned_(model, {Unit("attn", 1): None})
    with pytest.raises(InputError, match="llama, mistral families"):
        export(model, tmp_path / "a", export_format="nemotron-nas")
    model = tiny_model("llama")
    to_depthpruned_(model, {Unit("mlp", 1): BiasEmulator.empty(32)})
    with pytest.raises(InputError, match="cannot express emulators"):
        export(model, tmp_path / "b", export_format="nemotron-nas")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_nemotron_nas_refuses_a_width_that_ffn_mult_cannot_reproduce(tmp_path: Path) -> None:
    from depthprune.nemotron_nas import _ffn_mult_for

    # The engines' rule, int(2 * m * D / 3) rounded up to 256: SmolLM2's 576 -> 1536 (m = 4) and
    # Llama-3-8B's 4096 -> 14336 (m = 5.25) are reproducible; no multiple of 256 can give 64.
    assert _ffn_mult_for(1536, 576) == 4.0 and _ffn_mult_for(14336, 4096) == 5.25
    assert _ffn_mult_for(64, 32) is None and _ffn_mult_for(1000, 576) is None
    model = tiny_model("llama")  # intermediate_size 64
    to_depthpruned_(model, {Unit("attn", 1): None})
    with pytest.raises(InputError, match="intermediate_size 64 is not int"):
        export(model, tmp_path / "c", export_format="nemotron-nas")
    model = tiny_model("llama", intermediate_size=256)
    to_depthpruned_(model, {Unit("attn", 0): None})
    with pytest.raises(InputError, match="attention of layer 0"):
        export(model, tmp_path / "d", export_format="nemotron-nas")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_load_refuses_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        depthprune.load(tmp_path / "nope")
