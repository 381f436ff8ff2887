"""Streamed emulator fitting and held-out check equal the in-memory ones, reading each layer a bounded number of times."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_tokens, spy_layer_loads
from safetensors.torch import load_file

from depthprune.api import PruneConfig, prune_model
from depthprune.cli import main
from depthprune.data import load_calibration
from depthprune.errors import InputError
from depthprune.loading import LoadConfig, load_model
from depthprune.recover.emulate import BiasEmulator, EmulationConfig, fit_emulators
from depthprune.recover.select import select_emulators, split_tail
from depthprune.streamed import (
    ActivationStore,
    StreamConfig,
    open_streamed,
)
from depthprune.streamed.recover import (
    fit_emulators_streamed,
    select_emulators_streamed,
)
from depthprune.units import Unit

# Streamed and in-memory passes run the same modules on the same (B, T, D) batches (the
# streamed static metrics are bitwise equal on one thread, docs/streaming.md), and the
# statistics are the same float64 sums added in the same batch order, so the fitted
# parameters agree to float32 rounding at worst: the bound, 1e-5 relative. An
# absolute floor of 1e-6 covers entries that are themselves ~0 (a low-rank factor's
# smallest entries, after the float64 -> float32 cast).
REL, ABS = 1e-5, 1e-6
# The held-out losses: in memory a float32 cross-entropy per token summed in float64,
# streamed a float64 fold of the chunked head; they differ by about one float32 ulp of
# |log p| per token (~5e-7 for |log p| ~ 6, docs/streaming.md), i.e. < 1e-6 relative on a
# mean NLL of ~6.
LOSS_REL = 1e-6
CHUNKED = StreamConfig(head_chunk=96)  # the 320-token vocabulary spans several head chunks

PLAN = {Unit("attn", 1): "lowrank:4", Unit("mlp", 2): "bias", Unit("block", 3): "lowrank:3", Unit("mlp", 0): "none"}


def _tokens(n: int = 7, t: int = 24) -> Any:
    return random_tokens(n, t, seed=2)


def _same_params(a: torch.nn.Module | None, b: torch.nn.Module | None) -> None:
    assert type(a) is type(b)
    if a is None:
        return
    sa, sb = a.state_dict(), b.state_dict()  # type: ignore[union-attr]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=REL, atol=ABS, msg=k)


def _reads_per_layer(loads: list[str]) -> dict[int, int]:
    """Layer -> how many times its first tensor was read."""
    firsts: dict[int, str] = {}
    counts: dict[int, int] = {}
    for name in loads:
        i = int(name.split(".layers.")[1].split(".")[0])
        firsts.setdefault(i, name)
        counts[i] = counts.get(i, 0) + (name == firsts[i])
    return counts


def test_fit_and_check_equal_in_memory(sharded_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fit, heldout = split_tail(_tokens(), 0.3)
    assert heldout is not None
    config = EmulationConfig(batch_size=2, show_progress=False)  # the fit's 4 sequences in 2 batches
    model = load_model(sharded_llama).model
    expected = fit_emulators(model, fit, PLAN, config)
    loads = spy_layer_loads(monkeypatch)
    streamed = open_streamed(str(sharded_llama), CHUNKED)
    got = fit_emulators_streamed(streamed, fit, PLAN, config)
    assert expected.keys() == got.keys()
    for u in PLAN:
        _same_params(expected[u], got[u])
    assert _reads_per_layer(loads) == {i: 1 for i in range(4)}  # one pass up to block.3
    # A deliberately bad emulator for attn.1 (a huge constant update) is dropped in both,
    # so the check needs a second streamed pass from the new set.
    for bad in (False, True):
        loads.clear()
        mem = dict(expected)
        st = dict(got)
        if bad:
            mem[Unit("attn", 1)] = BiasEmulator(torch.full((32,), 50.0))
            st[Unit("attn", 1)] = mem[Unit("attn", 1)]
        kept_m, dec_m = select_emulators(model, mem, heldout, batch_size=2, show_progress=False)
        kept_s, dec_s = select_emulators_streamed(streamed, st, heldout, batch_size=2, show_progress=False)
        assert dec_m.keys() == dec_s.keys() == {Unit("attn", 1), Unit("mlp", 2), Unit("block", 3)}
        for u, d in dec_m.items():
            assert (dec_s[u].keep, dec_s[u].replace) == (d.keep, d.replace), u
            assert dec_s[u].loss_with == pytest.approx(d.loss_with, rel=LOSS_REL)
            assert dec_s[u].loss_without == pytest.approx(d.loss_without, rel=LOSS_REL)
        assert {u: e is None for u, e in kept_m.items()} == {u: e is None for u, e in kept_s.items()}
        # Measured: mlp.2's bias loses to plain removal (by 8e-5 in loss), so a drop mid-way
        # happens even without the bad emulator.
        assert not dec_m[Unit("mlp", 2)].keep
        assert dec_m[Unit("attn", 1)].keep is not bad
        drops = sum(not d.keep for u, d in dec_m.items() if u != Unit("block", 3))  # a drop at the last unit needs no pass
        # One pass, and one more per drop that leaves units to decide: each reads every layer once.
        assert _reads_per_layer(loads) == {i: 1 + drops for i in range(4)}
    assert all(p.device.type == "meta" for p in streamed.model.parameters())


# attn.0 reads the embeddings, mlp.1 the attention of its own layer, block.3 mlp.2 two
# layers... one layer back, whose output depends on whether attn.2 is emulated.
PLAN_LINEAR = {Unit("attn", 0): "linear:4", Unit("mlp", 1): "linear:full", Unit("attn", 2): "lowrank:2", Unit("block", 3): "linear:3"}


def test_linear_fit_and_check_equal_in_memory(sharded_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fit, heldout = split_tail(_tokens(), 0.3)
    config = EmulationConfig(batch_size=2, show_progress=False)
    model = load_model(sharded_llama).model
    expected = fit_emulators(model, fit, PLAN_LINEAR, config)
    streamed = open_streamed(str(sharded_llama), CHUNKED)
    got = fit_emulators_streamed(streamed, fit, PLAN_LINEAR, config)
    for u in PLAN_LINEAR:
        _same_params(expected[u], got[u])
    # Without a bad emulator mlp.1 and block.3 are dropped (measured); with a bad attn.0,
    # attn.0, mlp.1 and block.3. (A bad attn.2 leaves mlp.1 a near-tie, 7e-9 apart in memory,
    # below the two paths' 4e-8 agreement: no test can ask for the same decision there.)
    for bad in (None, Unit("attn", 0)):
        mem, st = dict(expected), dict(got)
        if bad is not None:  # a huge constant update: dropped, so later decisions start from a new set
            mem[bad] = st[bad] = BiasEmulator(torch.full((32,), 50.0))
        _, dec_m = select_emulators(model, mem, heldout, batch_size=2, show_progress=False)
        _, dec_s = select_emulators_streamed(streamed, st, heldout, batch_size=2, show_progress=False)
        assert {u: (d.keep, d.replace) for u, d in dec_m.items()} == {u: (d.keep, d.replace) for u, d in dec_s.items()}
        if bad is not None:
            assert not dec_m[bad].keep
        assert not dec_m[Unit("mlp", 1)].keep and not dec_m[Unit("block", 3)].keep
        assert all(abs(d.loss_with - d.loss_without) > 1e-6 for d in dec_m.values())  # no near-ties
        for u, d in dec_m.items():
            assert (dec_s[u].loss_with, dec_s[u].loss_without) == pytest.approx((d.loss_with, d.loss_without), rel=LOSS_REL), u


def _prune(model: Path, out: Path, data: Path, stream: StreamConfig | None, remove: str = "attn.1,mlp.2,block.3", **kw: Any) -> dict[str, Any]:
    config = PruneConfig(
        out=out, remove=remove, data=str(data), n_samples=6, seq_len=32, batch_size=2,
        show_progress=False, stream=stream, heldout=0.34, **kw,
    )
    prune_model(LoadConfig(str(model)), config)
    return json.loads((out / "depthprune.json").read_text())


@pytest.mark.parametrize("recover", ["bias", "lowrank:3", "linear:3"])
def test_prune_export_equals_in_memory(sharded_llama: Path, tmp_path: Path, recover: str) -> None:
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 97} x{i % 13}" for i in range(3000)))
    m_mem = _prune(sharded_llama, tmp_path / "mem", text, None, recover=recover)
    m_st = _prune(sharded_llama, tmp_path / "st", text, CHUNKED, recover=recover)
    assert m_st["recover"]["execution"] == "layer-streamed"
    units_m, units_s = m_mem["recover"]["units"], m_st["recover"]["units"]
    assert units_m.keys() == units_s.keys()
    for u, e in units_m.items():
        assert (units_s[u]["decision"], units_s[u].get("folded_into")) == (e["decision"], e.get("folded_into")), u
        assert units_s[u]["heldout_loss_with"] == pytest.approx(e["heldout_loss_with"], rel=LOSS_REL)
    a, b = _safetensors(tmp_path / "mem"), _safetensors(tmp_path / "st")
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=REL, atol=ABS, msg=k)


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_all_emulators_dropped_rewrites_the_shards(sharded_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 97} x{i % 13}" for i in range(3000)))
    # Measured on this model and text: both bias emulators lose to plain removal.
    m_mem = _prune(sharded_llama, tmp_path / "mem", text, None, remove="mlp.2,block.3", recover="bias", rewrite_shards=False)
    assert {e["decision"] for e in m_mem["recover"]["units"].values()} == {"drop"}

    def no_load(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("depthprune.api.load_model", no_load)
    m_st = _prune(sharded_llama, tmp_path / "st", text, CHUNKED, remove="mlp.2,block.3", recover="bias")
    assert m_st["recover"].pop("execution") == "layer-streamed"
    assert m_mem["recover"].pop("execution") == "in-memory"
    for doc in (m_mem, m_st):
        for e in doc["recover"]["units"].values():
            e.pop("heldout_loss_with"), e.pop("heldout_loss_without")
    assert m_st == m_mem
    a, b = _safetensors(tmp_path / "mem"), _safetensors(tmp_path / "st")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_prune_stream(sharded_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    base = ["prune", str(sharded_llama), "--remove", "attn.2", "--recover", "linear:2", "--data", str(text), "--samples", "4",
            "--seq-len", "16", "--stream", "--quiet", "-o", str(tmp_path / "o")]
    assert main([*base, "--stream-budget", "1KB"]) == 2  # cannot hold one layer
    assert "raise --stream-budget" in capsys.readouterr().err
    assert main([*base, "--stream-budget", "64MB"]) == 0
    manifest = json.loads((tmp_path / "o" / "depthprune.json").read_text())
    assert manifest["recover"]["execution"] == "layer-streamed"


def test_stories260k_fit_equals_in_memory(stories_lm: Any, stories_dir: Path, shared: Path) -> None:
    text = shared / "data" / "tinystories" / "tinystories_sample.txt"
    data = load_calibration(str(text), stories_lm.tokenizer, n_sequences=6, seq_len=64)
    fit, heldout = split_tail(data, 0.34)
    # mlp.2 reads attn.2's output in its own layer; block.3 reads attn.2's a layer later (mlp.2 is removed).
    plan = {Unit("attn", 0): "bias", Unit("mlp", 0): "lowrank:4", Unit("mlp", 2): "linear:8", Unit("block", 3): "linear:4"}
    config = EmulationConfig(batch_size=2, show_progress=False)
    expected = fit_emulators(stories_lm.model, fit, plan, config)
    streamed = open_streamed(str(stories_dir), CHUNKED)
    got = fit_emulators_streamed(streamed, fit, plan, config)
    for u in plan:
        _same_params(expected[u], got[u])
    _, dec_m = select_emulators(stories_lm.model, expected, heldout, batch_size=2, show_progress=False)
    _, dec_s = select_emulators_streamed(streamed, got, heldout, batch_size=2, show_progress=False)
    assert {u: d.keep for u, d in dec_m.items()} == {u: d.keep for u, d in dec_s.items()}
    for u, d in dec_m.items():
        assert (dec_s[u].loss_with, dec_s[u].loss_without) == pytest.approx((d.loss_with, d.loss_without), rel=LOSS_REL)


@pytest.mark.parametrize("fam", ["gemma2", "gpt2", "phi", "qwen2"])
def test_other_families_fit_and_check_equal_in_memory(fam: str, tiny_model_dirs: dict[str, Path]) -> None:
    # Gemma-2 (post-norms, soft-capped logits), GPT-2 (tied head, Conv1D), Phi (parallel
    # layer: the MLP reads the layer input), Qwen2.
    fit, heldout = split_tail(_tokens(n=5, t=20), 0.4)
    # block.2 -> linear reads attn.1's output (mlp.1 is removed); block.3 -> lowrank.
    plan = {Unit("attn", 0): "bias", Unit("mlp", 1): "lowrank:3", Unit("block", 2): "linear:2", Unit("block", 3): "lowrank:2"}
    config = EmulationConfig(batch_size=2, show_progress=False)
    model = load_model(tiny_model_dirs[fam]).model
    expected = fit_emulators(model, fit, plan, config)
    streamed = open_streamed(str(tiny_model_dirs[fam]), CHUNKED)
    got = fit_emulators_streamed(streamed, fit, plan, config)
    for u in plan:
        _same_params(expected[u], got[u])
    _, dec_m = select_emulators(model, expected, heldout, batch_size=2, show_progress=False)
    _, dec_s = select_emulators_streamed(streamed, got, heldout, batch_size=2, show_progress=False)
    assert {u: d.keep for u, d in dec_m.items()} == {u: d.keep for u, d in dec_s.items()}
    for u, d in dec_m.items():
        assert (dec_s[u].loss_with, dec_s[u].loss_without) == pytest.approx((d.loss_with, d.loss_without), rel=LOSS_REL)


def test_spilled_fit_and_check_are_the_same(sharded_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spilled: list[int] = []
    close = ActivationStore.close

    def record(self: ActivationStore) -> None:
        spilled.append(self.spilled_bytes)
        close(self)

    monkeypatch.setattr(ActivationStore, "close", record)
    fit, heldout = split_tail(_tokens(), 0.3)
    config = EmulationConfig(batch_size=1, show_progress=False)  # 4 fit batches: more than the budget holds
    plain = open_streamed(str(sharded_llama), CHUNKED)
    expected = fit_emulators_streamed(plain, fit, PLAN, config)
    _, dec_e = select_emulators_streamed(plain, expected, heldout, batch_size=1, show_progress=False)
    # The smallest budget accepted: one layer plus one batch in and out; everything else spills.
    budget = plain.weight_bytes() + 2 * 1 * 24 * plain.hidden_size * 4
    spill = tmp_path / "spill"
    spill.mkdir()
    tight = open_streamed(str(sharded_llama), StreamConfig(budget=budget, spill_dir=str(spill), head_chunk=96))
    spilled.clear()
    got = fit_emulators_streamed(tight, fit, PLAN, config)
    for u in PLAN:
        _same_params(expected[u], got[u])
    _, dec_g = select_emulators_streamed(tight, got, heldout, batch_size=1, show_progress=False)
    assert dec_g == dec_e  # the same float ops on the same tensors, read back from disk
    assert len(spilled) >= 3 and all(b > 0 for b in spilled)  # the fit and both check passes spilled
    assert list(spill.iterdir()) == []  # the spill folders are gone


def test_linear_before_a_parallel_mlp_is_refused(tiny_model_dirs: dict[str, Path]) -> None:
    # Phi's MLP runs after the attention of its layer: attn.1's writer would be mlp.1.
    streamed = open_streamed(str(tiny_model_dirs["phi"]))
    with pytest.raises(InputError, match="cannot have a linear emulator"):
        fit_emulators_streamed(streamed, _tokens(n=2, t=8), {Unit("attn", 1): "linear:2"})
