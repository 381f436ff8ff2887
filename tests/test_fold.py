"""Emulators folded into stock weights, and the held-out check that keeps or drops each one."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_model
from safetensors.torch import save_file

import depthprune
from depthprune.api import PruneConfig, prune_model
from depthprune.architectures import spec_for_config
from depthprune.cli import main
from depthprune.data import (
    CalibrationInfo,
    TokenBatches,
    context_length,
    load_calibration,
)
from depthprune.errors import InputError
from depthprune.export import read_manifest
from depthprune.loading import LoadConfig, load_model
from depthprune.recover.compare import heldout_loss
from depthprune.recover.emulate import (
    BiasEmulator,
    LinearEmulator,
    emulate,
    fit_emulators,
)
from depthprune.recover.fold import fold_, plan_folds
from depthprune.recover.install import install_
from depthprune.recover.select import split_tail
from depthprune.stream import ResidualStream, Writer
from depthprune.units import Unit

IDS = torch.tensor([[1, 5, 9, 40, 41, 42, 7, 8, 100, 200, 300, 12], [1, 50, 60, 70, 80, 90, 91, 92, 93, 94, 95, 96]])
# Float32 logits of a folded model differ from the unfolded emulation only by rounding:
# (I + M) W is formed in float64 and stored in float32, and sums run in another order.
# The issue's bound, 1e-4, is ~1000x the float32 spacing at these logits' size (~0.1-10).
ATOL = 1e-4


def _tokens(n: int = 6, t: int = 16, seed: int = 0) -> TokenBatches:
    ids = torch.randint(3, 320, (n, t), generator=torch.Generator().manual_seed(seed))
    return TokenBatches(ids, torch.ones_like(ids), CalibrationInfo("random", n, t, n * t, "", seed, None))


def _u(name: str) -> Unit:
    return Unit.parse(name)


# --------------------------------------------------------------------------- where a stand-in folds


def test_writer_before_sequential_and_parallel() -> None:
    spec = spec_for_config(tiny_model("llama").config)
    seq = ResidualStream(spec, parallel=False)
    par = ResidualStream(spec, parallel=True)
    gone = {1: {"attn", "mlp"}, 2: {"attn"}}
    assert seq.writer_before("block", 1, gone) == (Writer(0, "mlp"), [])
    assert seq.writer_before("attn", 2, gone) == (Writer(0, "mlp"), [(1, "mlp"), (1, "attn")])
    assert seq.writer_before("mlp", 3, {3: {"mlp"}}) == (Writer(3, "attn"), [])
    assert seq.writer_before("attn", 0, {0: {"attn"}}) == (Writer.embeddings(), [])
    assert seq.writer_before("block", 1, {0: {"attn", "mlp"}, 1: {"attn", "mlp"}}) == (
        Writer.embeddings(),
        [(0, "mlp"), (0, "attn")],
    )
    # A parallel layer's two paths write at one point: a kept sibling is the writer.
    assert par.writer_before("attn", 2, {2: {"attn"}}) == (Writer(2, "mlp"), [])
    assert par.writer_before("attn", 2, {2: {"attn", "mlp"}}) == (Writer(1, "mlp"), [(2, "mlp")])
    assert str(Writer(3, "attn")) == "attn.3" and str(Writer.embeddings()) == "embeddings"


@pytest.mark.parametrize(
    "plan",
    [
        {"block.1": "bias", "attn.2": "bias"},  # a run of removed units: biases add up in one writer
        {"block.1": "linear:4", "mlp.2": "linear:full"},
        {"block.0": "bias", "mlp.1": "linear:3"},  # block.0 folds into the (untied) embeddings
        {"mlp.0": "linear:3", "mlp.1": "bias", "attn.2": "lowrank:2"},  # low-rank stays a module
    ],
    ids=["bias-run", "linear", "embeddings", "mixed"],
)
def test_fold_equals_unfolded_emulation(family: str, plan: dict[str, str]) -> None:
    model = tiny_model(family)
    with torch.no_grad():  # random init leaves biases at zero; a fold must carry them through I + M
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "norm" not in name and "ln_" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    table = {_u(k): v for k, v in plan.items()}
    stand_ins = fit_emulators(model, _tokens(), table)
    with torch.no_grad():
        with emulate(model, stand_ins):
            emulated = model(IDS).logits
        with emulate(model, dict.fromkeys(table)):
            removed = model(IDS).logits
        folded_model = copy.deepcopy(model)
        remaining, result = fold_(folded_model, stand_ins)
        install_(folded_model, remaining)
        folded = folded_model(IDS).logits
    torch.testing.assert_close(folded, emulated, rtol=0, atol=ATOL)
    # The emulators change the logits, so equality above is not equality of two plain removals.
    assert (emulated - removed).abs().max() > 100 * ATOL
    foldable = {u for u, r in table.items() if r.startswith(("bias", "linear"))}
    assert set(result.folded) | set(result.refused) == {u for u, e in stand_ins.items() if e is not None}
    assert set(result.folded) <= foldable
    spec = spec_for_config(model.config)
    if spec.fold is None:
        assert not result.folded
        assert all("declares no fold targets" in result.refused[u] for u in foldable)
    elif all(r.startswith("linear") for r in table.values()):
        assert set(result.folded) == foldable  # a linear map folds wherever the family has a fold entry
    for unit in result.folded:
        assert remaining[unit] is None


def test_bias_flag_gives_zero_biases_except_the_folded_one() -> None:
    model = tiny_model("llama")
    assert not model.config.attention_bias and not model.config.mlp_bias
    stand_ins = fit_emulators(model, _tokens(), {_u("mlp.1"): "bias"})
    _, result = fold_(model, stand_ins)
    assert result.folded == {_u("mlp.1"): "attn.1"} and result.flags == ("attention_bias",)
    assert model.config.attention_bias and not model.config.mlp_bias
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(attn, name).bias, torch.zeros_like(getattr(attn, name).bias))
        expected = stand_ins[_u("mlp.1")].bias if i == 1 else torch.zeros_like(attn.o_proj.bias)
        torch.testing.assert_close(attn.o_proj.bias, expected, rtol=0, atol=1e-7)
        assert layer.mlp.down_proj.bias is None


def test_fold_refusals_say_why() -> None:
    data = _tokens()
    tied = tiny_model("llama", tie_word_embeddings=True)
    _, refused = plan_folds(tied, fit_emulators(tied, data, {_u("block.0"): "bias"}))
    assert "tied to the LM head" in refused[_u("block.0")]

    mistral = tiny_model("mistral")
    targets, refused = plan_folds(mistral, fit_emulators(mistral, data, {_u("block.3"): "bias", _u("block.1"): "linear:2"}))
    assert targets == {_u("block.1"): Writer(0, "mlp")}
    assert "cannot carry a bias" in refused[_u("block.3")] and "linear:R" in refused[_u("block.3")]
    llama = tiny_model("llama")
    # mlp.1's bias would fold into mlp.0, past attn.1, whose low-rank map reads the stream there.
    stand_ins = fit_emulators(llama, data, {_u("attn.1"): "lowrank:2", _u("mlp.1"): "bias"})
    targets, refused = plan_folds(llama, stand_ins)
    assert not targets
    assert "attn.1's lowrank:2 emulator reads the stream between mlp.0 and mlp.1" in refused[_u("mlp.1")]
    assert "only bias and linear:R fold" in refused[_u("attn.1")]

    # Stand-ins before the reader still fold; the one after it stays a module.
    stand_ins = fit_emulators(llama, data, {_u("attn.1"): "bias", _u("mlp.1"): "bias", _u("attn.2"): "lowrank:2", _u("mlp.2"): "bias"})
    targets, refused = plan_folds(llama, stand_ins)
    assert targets == {_u("attn.1"): Writer(0, "mlp"), _u("mlp.1"): Writer(0, "mlp")}
    assert "attn.2's lowrank:2 emulator" in refused[_u("mlp.2")]

    # A linear emulator left as a module reads mlp.0's output, so nothing else folds into mlp.0.
    stand_ins = fit_emulators(llama, data, {_u("attn.1"): "bias", _u("mlp.1"): "lowrank:2", _u("attn.2"): "linear:2"})
    targets, refused = plan_folds(llama, stand_ins)
    assert not targets and "together with attn.2" in refused[_u("attn.1")]
    folded = copy.deepcopy(llama)
    remaining, _ = fold_(folded, stand_ins)
    with torch.no_grad(), emulate(llama, stand_ins):
        ref = llama(IDS).logits
    install_(folded, remaining)
    with torch.no_grad():
        torch.testing.assert_close(folded(IDS).logits, ref, rtol=0, atol=ATOL)


def test_linear_emulator_of_attention_beside_a_kept_parallel_mlp_is_refused() -> None:
    model = tiny_model("phi")
    with pytest.raises(InputError, match="computes after the attention"):
        fit_emulators(model, _tokens(), {_u("attn.1"): "linear:2"})


# --------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("the quick brown fox jumps over the lazy dog and the cat sat on the mat. " * 80)
    return path


def _plain_transformers_logits(folder: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Logits of ``folder`` loaded by transformers in a process that never imports depthprune."""
    out = tmp_path / "plain.safetensors"
    save_file({"ids": ids.contiguous()}, tmp_path / "ids.safetensors")
    code = (
        "import sys, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32).eval()\n"
        "assert 'depthprune' not in sys.modules\n"
        f"ids = load_file({str(tmp_path / 'ids.safetensors')!r})['ids']\n"
        "with torch.no_grad():\n"
        f"    save_file({{'logits': m(ids).logits.contiguous()}}, {str(out)!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    from safetensors.torch import load_file

    return load_file(out)["logits"]


def _prune(model_dir: Path, out: Path, **kwargs: object) -> dict:
    prune_model(LoadConfig(str(model_dir), dtype="float32"), PruneConfig(out=out, show_progress=False, **kwargs))
    return read_manifest(out)


def test_folded_export_is_a_standard_checkpoint_equal_to_the_unfolded_one(
    tiny_model_dirs: dict[str, Path], text: Path, tmp_path: Path
) -> None:
    plan = tmp_path / "plan.json"
    entries = {"block.0": "bias", "block.2": "bias", "block.3": "linear:4"}
    plan.write_text(json.dumps({"remove": [{"unit": u, "replace": r} for u, r in entries.items()]}))
    common = {"plan": plan, "data": text, "n_samples": 6, "seq_len": 16, "heldout": 0.0}
    manifest = _prune(tiny_model_dirs["llama"], tmp_path / "folded", **common)
    _prune(tiny_model_dirs["llama"], tmp_path / "modules", fold=False, **common)

    config = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert config["model_type"] == "llama" and "depthprune" not in config
    assert config["num_hidden_layers"] == 1 and config["mlp_bias"] is True
    assert (tmp_path / "folded" / "model.safetensors").is_file()
    units = manifest["recover"]["units"]
    # block.2's bias and block.3's linear map both fold into mlp.1 (the map first, then the bias).
    assert {u: units[u]["folded_into"] for u in entries} == {"block.0": "embeddings", "block.2": "mlp.1", "block.3": "mlp.1"}
    assert manifest["recover"]["bias_flags"] == ["mlp_bias"] and manifest["removed"] == ["block.0", "block.2", "block.3"]

    unfolded = depthprune.load(tmp_path / "modules")
    assert json.loads((tmp_path / "modules" / "config.json").read_text())["model_type"] == "depthprune_llama"
    with torch.no_grad():
        ref = unfolded(IDS).logits
    torch.testing.assert_close(_plain_transformers_logits(tmp_path / "folded", IDS, tmp_path), ref, rtol=0, atol=ATOL)


def test_sublayer_export_with_folded_emulators_keeps_only_plain_slots(
    tiny_model_dirs: dict[str, Path], text: Path, tmp_path: Path
) -> None:
    common = {"remove": "attn.2,mlp.1", "recover": "bias", "data": text, "n_samples": 6, "seq_len": 16, "heldout": 0.0}
    _prune(tiny_model_dirs["llama"], tmp_path / "folded", **common)
    _prune(tiny_model_dirs["llama"], tmp_path / "modules", fold=False, **common)
    config = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert {e["replace"] for e in config["depthprune"]["units"]} == {"none"}
    assert config["attention_bias"] is True and config["mlp_bias"] is False  # mlp.1 -> o_proj of attn.1
    with torch.no_grad():
        torch.testing.assert_close(
            depthprune.load(tmp_path / "folded")(IDS).logits, depthprune.load(tmp_path / "modules")(IDS).logits, rtol=0, atol=ATOL
        )


# --------------------------------------------------------------------------- stories260K


@pytest.fixture(scope="module")
def stories_text(shared: Path) -> Path:
    return shared / "data" / "tinystories" / "tinystories_sample.txt"


def test_stories_folded_export_equals_unfolded(stories_dir: Path, stories_text: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    entries = {"block.1": "bias", "block.3": "linear:full"}
    plan.write_text(json.dumps({"remove": [{"unit": u, "replace": r} for u, r in entries.items()]}))
    common = {"plan": plan, "data": stories_text, "n_samples": 8, "seq_len": 64, "heldout": 0.0}
    manifest = _prune(stories_dir, tmp_path / "folded", **common)
    _prune(stories_dir, tmp_path / "modules", fold=False, **common)
    assert {u: manifest["recover"]["units"][u]["folded_into"] for u in entries} == {"block.1": "mlp.0", "block.3": "mlp.2"}
    assert json.loads((tmp_path / "folded" / "config.json").read_text())["model_type"] == "llama"
    ids = load_model(str(stories_dir)).tokenizer(["Once upon a time there was a little dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = depthprune.load(tmp_path / "modules")(ids).logits
    torch.testing.assert_close(_plain_transformers_logits(tmp_path / "folded", ids, tmp_path), ref, rtol=0, atol=ATOL)


def test_stories_block0_bias_is_not_folded_into_tied_embeddings(stories_dir: Path, stories_text: Path, tmp_path: Path) -> None:
    manifest = _prune(stories_dir, tmp_path / "out", remove="block.0", recover="bias", data=stories_text, n_samples=8, seq_len=64, heldout=0.0)
    unit = manifest["recover"]["units"]["block.0"]
    assert unit["folded_into"] is None and "tied to the LM head" in unit["fold_refused"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "depthprune_llama"


def test_stories_keep_or_drop_follows_the_heldout_losses(stories_dir: Path, stories_text: Path, tmp_path: Path) -> None:
    """On 8 fit sequences of 64 tokens, bias hurts attn.0 and helps block.1 on the 2 held out."""
    manifest = _prune(
        stories_dir, tmp_path / "out", remove="attn.0,block.1,mlp.2", recover="bias", data=stories_text, n_samples=10, seq_len=64
    )
    units = manifest["recover"]["units"]
    for name, unit in units.items():
        keep = unit["heldout_loss_with"] < unit["heldout_loss_without"]
        assert unit["decision"] == ("keep" if keep else "drop"), (name, unit)
    decisions = {u: units[u]["decision"] for u in units}
    assert decisions["attn.0"] == "drop" and decisions["block.1"] == "keep", units  # neither always keep nor always drop
    assert units["attn.0"]["folded_into"] is None and units["block.1"]["folded_into"] == "mlp.0"

    # The recorded losses are the exported model's: measured again on the held-out tail.
    loaded = load_model(str(stories_dir))
    calib = load_calibration(stories_text, loaded.tokenizer, n_sequences=10, seq_len=64, max_context=context_length(loaded.model))
    fit, heldout = split_tail(calib, 0.2)
    assert len(fit) == 8 and len(heldout) == 2 and torch.equal(heldout.input_ids, calib.input_ids[8:])
    assert manifest["recover"]["heldout"]["sha256"] == heldout.info.sha256
    last = units["mlp.2"]
    final = min(last["heldout_loss_with"], last["heldout_loss_without"])
    assert heldout_loss(depthprune.load(tmp_path / "out"), heldout) == pytest.approx(final, abs=1e-5)


def test_stories_lowrank4_of_mlp0_is_dropped(stories_dir: Path, stories_text: Path, tmp_path: Path) -> None:
    manifest = _prune(stories_dir, tmp_path / "out", remove="mlp.0", recover="lowrank:4", data=stories_text, n_samples=10, seq_len=64)
    unit = manifest["recover"]["units"]["mlp.0"]
    assert unit["decision"] == "drop" and unit["heldout_loss_with"] > unit["heldout_loss_without"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [e["replace"] for e in config["depthprune"]["units"]] == ["none"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--recover", "linear:abc"], "unknown --recover value 'linear:abc'"),
        (["--recover", "linear:0"], "unknown --recover value 'linear:0'"),
        (["--recover", "linear:-3"], "unknown --recover value 'linear:-3'"),
        (["--recover", "linear:33", "--data", "x.txt"], "rank 33 of block.1 -> linear:33 is out of range: the model's width is 32"),
        (["--recover", "bias", "--heldout", "1.5", "--data", "x.txt"], "held-out fraction 1.5 is invalid"),
        (["--recover", "bias", "--heldout", "-0.1", "--data", "x.txt"], "held-out fraction -0.1 is invalid"),
    ],
)
def test_bad_recover_input_is_one_line_exit_2(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    out = tmp_path / "out"
    code = main(["prune", str(tiny_model_dirs["llama"]), "--remove", "block.1", *extra, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_linear_needs_prune_not_recover_compare() -> None:
    from depthprune.recover.compare import CompareConfig

    with pytest.raises(InputError, match="only `depthprune prune --recover linear:R` fits it"):
        CompareConfig(methods=("none", "linear:4"))


def test_linear_emulator_round_trips_in_a_depthprune_export(tiny_model_dirs: dict[str, Path], text: Path, tmp_path: Path) -> None:
    """--no-fold keeps a linear emulator as a module; loading re-attaches its writer hook."""
    _prune(tiny_model_dirs["qwen2"], tmp_path / "out", remove="mlp.2", recover="linear:4", data=text, n_samples=6, seq_len=16, heldout=0.0, fold=False)
    model = depthprune.load(tmp_path / "out")
    emulators = [m for m in model.modules() if isinstance(m, LinearEmulator)]
    assert len(emulators) == 1 and emulators[0].rank == 4
    assert not any(isinstance(m, BiasEmulator) for m in model.modules())
    source = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32")
    calib = load_calibration(text, source.tokenizer, n_sequences=6, seq_len=16, max_context=context_length(source.model))
    fitted = fit_emulators(source.model, calib, {_u("mlp.2"): "linear:4"})
    with torch.no_grad(), emulate(source.model, fitted):
        ref = source.model(IDS).logits
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f in ("llama", "gpt2")])
def test_fold_works_on_bfloat16_weights(fam: str) -> None:
    model = tiny_model(fam).to(torch.bfloat16)
    stand_ins = fit_emulators(model, _tokens(), {_u("block.2"): "linear:4"})
    remaining, result = fold_(model, stand_ins)
    assert result.folded == {_u("block.2"): "mlp.1"} and remaining[_u("block.2")] is None
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
