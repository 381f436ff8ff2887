"""Layer-streamed execution gives the in-memory numbers, reads each layer once, and cleans up its spill folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from depthprune.cli import main
from depthprune.data import load_calibration, pack
from depthprune.errors import InputError
from depthprune.evaluate.perplexity import PerplexityConfig, perplexity
from depthprune.loading import load_model
from depthprune.score import ScoreConfig, score
from depthprune.streamed import (
    LazyCheckpoint,
    StreamConfig,
    open_streamed,
    perplexity_streamed,
    score_streamed,
)
from depthprune.streamed.runner import StreamedModel
from depthprune.units import Unit, mask_units

# Streamed and in-memory execution run the same modules on the same (B, T, D) batches, so
# they agree to float32 rounding at worst; the bound is 1e-5 relative.
REL = 1e-5
ALL_METRICS = ("cosine", "angular", "rel_l1", "rel_l2", "angular_span", "loo_loss", "loo_kl")
TEXT = "the quick brown fox jumps over the lazy dog and the cat sat on the mat. " * 40


def _close(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> None:
    assert a.keys() == b.keys()
    for metric, values in a.items():
        assert values.keys() == b[metric].keys()
        for unit, v in values.items():
            assert b[metric][unit] == pytest.approx(v, rel=REL, abs=1e-12), (metric, unit)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved in several safetensors shards, with a tokenizer."""
    path = tmp_path_factory.mktemp("sharded") / "llama"
    tiny_model("llama", seed=3).save_pretrained(path, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(TEXT)
    return path


def _tokens(n: int = 5, t: int = 24, vocab: int = 320) -> Any:
    g = torch.Generator().manual_seed(1)
    return pack(torch.randint(3, vocab, (n * t,), generator=g).tolist(), n, t)


def test_sharded_checkpoint_is_read_from_several_files(sharded_llama: Path) -> None:
    index = json.loads((sharded_llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    ckpt = LazyCheckpoint.open(sharded_llama)
    assert all(p.device.type == "meta" for p in ckpt.model.parameters())


def test_scores_equal_in_memory_on_a_sharded_model(sharded_llama: Path) -> None:
    data = _tokens()
    config = ScoreConfig(metrics=ALL_METRICS, batch_size=2, show_progress=False)  # 3 batches, the last one short
    expected = score(load_model(sharded_llama).model, data, config)
    streamed = open_streamed(str(sharded_llama))
    got = score_streamed(streamed, data, config)
    _close(expected.scores, got.scores)
    _close(expected.stderr, got.stderr)  # type: ignore[arg-type]
    # 12 leave-one-out candidates and the static metrics in one pass: each layer read once.
    assert got.cost["stream_layer_reads"] == 4


def test_each_layer_is_loaded_once_per_pass(sharded_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    real = LazyCheckpoint.load_

    def spy(self: LazyCheckpoint, names: Any) -> None:
        names = list(names)
        loads.extend(names)
        real(self, names)

    monkeypatch.setattr(LazyCheckpoint, "load_", spy)
    streamed = open_streamed(str(sharded_llama))
    score_streamed(streamed, _tokens(), ScoreConfig(metrics=("loo_loss",), show_progress=False))
    layer_loads = [n for n in loads if ".layers." in n]
    assert layer_loads and len(layer_loads) == len(set(layer_loads))
    assert all(p.device.type == "meta" for p in streamed.model.parameters())  # everything freed after


@pytest.mark.parametrize("fam", ["gemma2", "gpt2", "phi", "qwen2"])
def test_other_families_match_in_memory(fam: str, tiny_model_dirs: dict[str, Path]) -> None:
    data = _tokens(n=3, t=20)
    config = ScoreConfig(metrics=("cosine", "rel_l1", "loo_loss", "loo_kl"), batch_size=2, show_progress=False)
    expected = score(load_model(tiny_model_dirs[fam]).model, data, config)
    _close(expected.scores, score_streamed(open_streamed(str(tiny_model_dirs[fam])), data, config).scores)


def test_perplexity_equals_in_memory_with_masks_and_padding(sharded_llama: Path, text_file: Path) -> None:
    lm = load_model(sharded_llama)
    # 300 tokens in windows of 64: the last window is short, so its batch is padded.
    config = PerplexityConfig(seq_len=64, max_tokens=300, batch_size=2, show_progress=False)
    masked = [Unit("attn", 1), Unit("block", 2)]
    with mask_units(lm.model, masked):
        expected = perplexity(lm.model, lm.tokenizer, text_file, config)
    got = perplexity_streamed(open_streamed(str(sharded_llama)), lm.tokenizer, str(text_file), config, masked)
    assert got["n_scored"] == expected["n_scored"]
    assert got["nll"] == pytest.approx(expected["nll"], rel=REL)
    assert got["protocol"]["execution"] == "layer-streamed"


def test_stories260k_matches_in_memory(stories_lm: Any, stories_dir: Path, shared: Path) -> None:
    text = shared / "data" / "tinystories" / "tinystories_sample.txt"
    data = load_calibration(str(text), stories_lm.tokenizer, n_sequences=4, seq_len=64)
    config = ScoreConfig(metrics=("cosine", "angular", "rel_l1", "rel_l2", "loo_loss", "loo_kl"), batch_size=3, show_progress=False)
    streamed = open_streamed(str(stories_dir))
    _close(score(stories_lm.model, data, config).scores, score_streamed(streamed, data, config).scores)
    ppl = PerplexityConfig(seq_len=64, max_tokens=600, show_progress=False)
    expected = perplexity(stories_lm.model, stories_lm.tokenizer, text, ppl)
    got = perplexity_streamed(streamed, stories_lm.tokenizer, str(text), ppl)
    assert got["nll"] == pytest.approx(expected["nll"], rel=REL)


# --------------------------------------------------------------------------- spilling


def _budget(streamed: StreamedModel, data: Any, batch_size: int) -> int:
    """The smallest budget streamed scoring accepts: one layer plus one batch in and out."""
    batch = batch_size * data.input_ids.shape[1] * streamed.hidden_size * 4
    return streamed.weight_bytes() + 2 * batch


def test_spilled_activations_give_the_same_scores_and_the_folder_goes(sharded_llama: Path, tmp_path: Path) -> None:
    data = _tokens()
    config = ScoreConfig(metrics=("cosine", "loo_loss"), batch_size=2, show_progress=False)
    expected = score_streamed(open_streamed(str(sharded_llama)), data, config)
    probe = open_streamed(str(sharded_llama))
    spill = tmp_path / "spill"
    spill.mkdir()
    streamed = open_streamed(str(sharded_llama), StreamConfig(budget=_budget(probe, data, 2), spill_dir=str(spill)))
    got = score_streamed(streamed, data, config)
    assert got.cost["stream_spilled_bytes"] > 0
    _close(expected.scores, got.scores)
    assert list(spill.iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_spill_folder_is_removed_after_an_error(
    error: type[BaseException], sharded_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _tokens()
    probe = open_streamed(str(sharded_llama))
    spill = tmp_path / "spill"
    spill.mkdir()
    seen: list[int] = []

    def fail(self: StreamedModel, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(list(spill.iterdir())))  # the spill folder exists when the head runs
        raise error("injected")

    monkeypatch.setattr(StreamedModel, "head", fail)
    streamed = open_streamed(str(sharded_llama), StreamConfig(budget=_budget(probe, data, 2), spill_dir=str(spill)))
    with pytest.raises(error):
        score_streamed(streamed, data, ScoreConfig(metrics=("loo_loss",), batch_size=2, show_progress=False))
    assert seen == [1]
    assert list(spill.iterdir()) == []


# --------------------------------------------------------------------------- refusals


def test_budget_below_one_layer_is_refused(sharded_llama: Path) -> None:
    streamed = open_streamed(str(sharded_llama), StreamConfig(budget=1000))
    with pytest.raises(InputError, match="cannot hold one layer"):
        score_streamed(streamed, _tokens(), ScoreConfig(metrics=("cosine",), show_progress=False))


def test_unsupported_metrics_and_gguf_are_refused(sharded_llama: Path, tmp_path: Path) -> None:
    streamed = open_streamed(str(sharded_llama))
    with pytest.raises(InputError, match="not supported with --stream"):
        score_streamed(streamed, _tokens(), ScoreConfig(metrics=("shapley",), show_progress=False))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="convert-gguf"):
        open_streamed(str(gguf))


def test_cli_stream_score_and_bad_budget(sharded_llama: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scores.json"
    common = ["-q", "score", str(sharded_llama), "--data", str(text_file), "--samples", "3", "--seq-len", "16", "--metrics", "cosine,loo_loss"]
    assert main([*common, "--stream", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["definitions"]["loo_loss"]["execution"] == "layer-streamed"
    assert main([*common, "--stream", "--stream-budget", "1KB", "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot hold one layer" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_a_disk_too_small_for_the_spill_is_refused_and_cleaned(sharded_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    from depthprune.streamed import SpillSpaceError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(1 << 30, 1 << 30, 1 << 20))
    data = _tokens()
    probe = open_streamed(str(sharded_llama))
    spill = tmp_path / "spill"
    spill.mkdir()
    streamed = open_streamed(str(sharded_llama), StreamConfig(budget=_budget(probe, data, 2), spill_dir=str(spill)))
    with pytest.raises(SpillSpaceError, match="too little"):
        score_streamed(streamed, data, ScoreConfig(metrics=("loo_loss",), batch_size=2, show_progress=False))
    assert list(spill.iterdir()) == []


@pytest.mark.parametrize(("text", "expected"), [("1024", 1024), ("2KB", 2048), ("1.5GB", 3 << 29), ("64MiB", 64 << 20)])
def test_parse_bytes(text: str, expected: int) -> None:
    from depthprune.streamed import parse_bytes

    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5MB", "3XB", "0"])
def test_parse_bytes_refuses_nonsense(text: str) -> None:
    from depthprune.streamed import parse_bytes

    with pytest.raises(InputError):
        parse_bytes(text)
