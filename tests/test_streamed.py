"""Layer-streamed execution gives the in-memory numbers, reads each layer once, and cleans up its spill folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens

from depthprune.cli import main
from depthprune.data import load_calibration
from depthprune.errors import InputError
from depthprune.evaluate.perplexity import PerplexityConfig, perplexity
from depthprune.loading import load_model
from depthprune.score import ScoreConfig, score
from depthprune.score.values import ValueConfig
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
# Vocabulary rows per LM-head chunk in the equality tests: the tiny vocabularies (320, 512)
# then span several chunks, the last one short.
CHUNKED = StreamConfig(head_chunk=96)


# Leave-one-out values are differences of two per-token NLLs (and KL a sum of differences
# of log-probabilities). In memory each log-probability comes from a float32 log_softmax,
# rounded to about one float32 ulp of |log p| (4.8e-7 for |log p| in [4, 8), as in these
# models with 320-512 tokens); streamed execution folds the chunked head in float64, exact
# to ~1e-15 (test_chunked_nll_and_kl_equal_log_softmax). A value is a mean over 19+ tokens
# whose roundings are independent, so the two differ by a fraction of an ulp absolutely,
# whatever the value (measured on the five families: <= 1.1e-7), and a relative bound
# alone cannot hold for values near 1e-4 (measured: up to 2e-3 relative on a KL of 1.2e-5).
LOO_ABS = 5e-7


def _close(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> None:
    assert a.keys() == b.keys()
    for metric, values in a.items():
        assert values.keys() == b[metric].keys()
        tol = LOO_ABS if metric.startswith("loo_") else 1e-12
        for unit, v in values.items():
            assert b[metric][unit] == pytest.approx(v, rel=REL, abs=tol), (metric, unit)


def test_sharded_checkpoint_is_read_from_several_files(sharded_llama: Path) -> None:
    index = json.loads((sharded_llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    ckpt = LazyCheckpoint.open(sharded_llama)
    assert all(p.device.type == "meta" for p in ckpt.model.parameters())


def test_scores_equal_in_memory_on_a_sharded_model(sharded_llama: Path) -> None:
    data = random_tokens()
    config = ScoreConfig(metrics=ALL_METRICS, batch_size=2, show_progress=False)  # 3 batches, the last one short
    expected = score(load_model(sharded_llama).model, data, config)
    streamed = open_streamed(str(sharded_llama), CHUNKED)
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
    score_streamed(streamed, random_tokens(), ScoreConfig(metrics=("loo_loss",), show_progress=False))
    layer_loads = [n for n in loads if ".layers." in n]
    assert layer_loads and len(layer_loads) == len(set(layer_loads))
    assert all(p.device.type == "meta" for p in streamed.model.parameters())  # everything freed after


@pytest.mark.parametrize("fam", ["gemma2", "gpt2", "phi", "qwen2"])
def test_other_families_match_in_memory(fam: str, tiny_model_dirs: dict[str, Path]) -> None:
    data = random_tokens(n=3, t=20)
    config = ScoreConfig(metrics=("cosine", "rel_l1", "loo_loss", "loo_kl"), batch_size=2, show_progress=False)
    expected = score(load_model(tiny_model_dirs[fam]).model, data, config)
    _close(expected.scores, score_streamed(open_streamed(str(tiny_model_dirs[fam]), CHUNKED), data, config).scores)


def test_perplexity_equals_in_memory_with_masks_and_padding(sharded_llama: Path, stream_text_file: Path) -> None:
    lm = load_model(sharded_llama)
    # 300 tokens in windows of 64: the last window is short, so its batch is padded.
    config = PerplexityConfig(seq_len=64, max_tokens=300, batch_size=2, show_progress=False)
    masked = [Unit("attn", 1), Unit("block", 2)]
    with mask_units(lm.model, masked):
        expected = perplexity(lm.model, lm.tokenizer, stream_text_file, config)
    got = perplexity_streamed(open_streamed(str(sharded_llama), CHUNKED), lm.tokenizer, str(stream_text_file), config, masked)
    assert got["n_scored"] == expected["n_scored"]
    assert got["nll"] == pytest.approx(expected["nll"], rel=REL)
    assert got["protocol"]["execution"] == "layer-streamed"


def test_stories260k_matches_in_memory(stories_lm: Any, stories_dir: Path, shared: Path) -> None:
    text = shared / "data" / "tinystories" / "tinystories_sample.txt"
    data = load_calibration(str(text), stories_lm.tokenizer, n_sequences=4, seq_len=64)
    config = ScoreConfig(metrics=("cosine", "angular", "rel_l1", "rel_l2", "loo_loss", "loo_kl"), batch_size=3, show_progress=False)
    streamed = open_streamed(str(stories_dir), CHUNKED)
    _close(score(stories_lm.model, data, config).scores, score_streamed(streamed, data, config).scores)
    ppl = PerplexityConfig(seq_len=64, max_tokens=600, show_progress=False)
    expected = perplexity(stories_lm.model, stories_lm.tokenizer, text, ppl)
    got = perplexity_streamed(streamed, stories_lm.tokenizer, str(text), ppl)
    assert got["nll"] == pytest.approx(expected["nll"], rel=REL)


# --------------------------------------------------------------------------- the LM head in chunks


def _random_logits(v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    # Scales that grow along the vocabulary, so the running maximum moves from chunk to chunk.
    x = torch.randn(3, 11, v, generator=g) * torch.linspace(1.0, 12.0, v)
    y = x + 0.3 * torch.randn(3, 11, v, generator=g)
    return x, y, torch.randint(0, v, (3, 11), generator=g)


@pytest.mark.parametrize("rows", [1, 7, 250, 1000, 4096])
def test_chunked_nll_and_kl_equal_log_softmax(rows: int) -> None:
    from depthprune.streamed.head import ChunkedKL, ChunkedLogSumExp

    v = 1000
    x, y, targets = _random_logits(v)
    lse_x, lse_y, kl = ChunkedLogSumExp(targets), ChunkedLogSumExp(targets), ChunkedKL(targets.shape)
    for start in range(0, v, rows):
        xc, yc = x[..., start : start + rows].double(), y[..., start : start + rows].double()
        alpha, e = lse_x.add(start, xc)
        lse_y.add(start, yc)
        kl.add(alpha, e, xc, yc)
    logp_x, logp_y = F.log_softmax(x.double(), -1), F.log_softmax(y.double(), -1)
    nll64 = -logp_x.gather(-1, targets[..., None]).squeeze(-1)
    kl64 = (logp_x.exp() * (logp_x - logp_y)).sum(-1)
    # Float64 against float64 in another order: terms of size <= ~50, rounding 1.1e-16 each,
    # a few thousand operations per token -> well under 1e-11. A target taken from the wrong
    # chunk, or a sum not rescaled when the maximum moves, is off by 1e-3 or more.
    assert torch.allclose(lse_x.nll, nll64, rtol=0, atol=1e-11)
    assert torch.allclose(kl.value(lse_x, lse_y), kl64, rtol=0, atol=1e-11)
    # The in-memory float32 log_softmax is within a few float32 ulps (|log p| < 256 here: ulp 1.5e-5).
    nll32 = -F.log_softmax(x, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(lse_x.nll, nll32.double(), rtol=0, atol=6e-5)


@pytest.mark.parametrize("fam", ["llama", "gpt2"])  # an LM head of its own; one tied to the embeddings
def test_the_lm_head_is_never_read_whole(fam: str, tiny_model_dirs: dict[str, Path], stream_text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    reads: list[tuple[tuple[str, ...], int, int]] = []
    real_load, real_rows = LazyCheckpoint.load_, LazyCheckpoint.read_rows

    def spy_load(self: LazyCheckpoint, names: Any) -> None:
        names = list(names)
        loads.extend(names)
        real_load(self, names)

    def spy_rows(self: LazyCheckpoint, names: Any, start: int, stop: int) -> Any:
        names = tuple(names)
        reads.append((names, start, stop))
        return real_rows(self, names, start, stop)

    monkeypatch.setattr(LazyCheckpoint, "load_", spy_load)
    monkeypatch.setattr(LazyCheckpoint, "read_rows", spy_rows)
    streamed = open_streamed(str(tiny_model_dirs[fam]), CHUNKED)
    head = streamed.model.get_output_embeddings()
    vocab = head.out_features
    head_names = [n for n, _ in streamed.model.named_parameters(remove_duplicate=False) if n.startswith(streamed._head_path + ".")]
    embed_names = streamed.ckpt.parameter_names(streamed.model.get_input_embeddings())
    score_streamed(streamed, random_tokens(n=3, t=20), ScoreConfig(metrics=("loo_loss", "loo_kl"), batch_size=2, show_progress=False))
    # Nothing of the head is loaded whole; a tied embedding is loaded once, for the input stage only.
    assert not set(head_names) & set(loads)
    assert sorted(n for n in loads if n in embed_names) == sorted(embed_names)
    # One pass over the head, in chunks of at most 96 rows that tile the vocabulary.
    assert {names for names, _, _ in reads} == {tuple(head_names)}
    assert [(a, b) for _, a, b in reads] == [(a, min(a + 96, vocab)) for a in range(0, vocab, 96)]
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
    reads.clear()
    tok = load_model(tiny_model_dirs[fam]).tokenizer
    perplexity_streamed(streamed, tok, str(stream_text_file), PerplexityConfig(seq_len=32, max_tokens=100, show_progress=False))
    assert [b - a for _, a, b in reads] and max(b - a for _, a, b in reads) <= 96


def test_a_head_that_cannot_be_chunked_is_loaded_whole(sharded_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = random_tokens()
    config = ScoreConfig(metrics=("loo_loss", "loo_kl"), batch_size=2, show_progress=False)
    expected = score(load_model(sharded_llama).model, data, config)
    monkeypatch.setattr(StreamedModel, "head_is_chunked", property(lambda self: False))
    reads: list[int] = []
    monkeypatch.setattr(LazyCheckpoint, "read_rows", lambda *a: reads.append(1))
    streamed = open_streamed(str(sharded_llama), CHUNKED)
    assert streamed.head_chunk_rows() is None and streamed.n_head_chunks() == 1
    _close(expected.scores, score_streamed(streamed, data, config).scores)
    assert reads == []


def test_head_chunk_follows_the_budget(sharded_llama: Path) -> None:
    probe = open_streamed(str(sharded_llama))
    assert probe.head_chunk_rows() == probe.vocab_size  # the default 4096 rows cover the tiny vocabulary
    layer = max(probe.ckpt.nbytes(n) for n in probe._layer_names)
    budgeted = open_streamed(str(sharded_llama), StreamConfig(budget=1 << 30))
    rows = budgeted.head_chunk_rows()
    assert rows is not None and rows * probe._head_row_bytes() <= layer < (rows + 1) * probe._head_row_bytes()


# --------------------------------------------------------------------------- spilling


def _budget(streamed: StreamedModel, data: Any, batch_size: int) -> int:
    """The smallest budget streamed scoring accepts: one layer plus one batch in and out."""
    batch = batch_size * data.input_ids.shape[1] * streamed.hidden_size * 4
    return streamed.weight_bytes() + 2 * batch


def test_spilled_activations_give_the_same_scores_and_the_folder_goes(sharded_llama: Path, tmp_path: Path) -> None:
    data = random_tokens()
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
    data = random_tokens()
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
        score_streamed(streamed, random_tokens(), ScoreConfig(metrics=("cosine",), show_progress=False))


def test_unsupported_metrics_and_gguf_are_refused(sharded_llama: Path, tmp_path: Path) -> None:
    streamed = open_streamed(str(sharded_llama))
    mmlu = ValueConfig("mmlu", mmlu=str(tmp_path))  # shapley streams for the loss and kl values only
    with pytest.raises(InputError, match="not supported with --stream"):
        score_streamed(streamed, random_tokens(), ScoreConfig(metrics=("shapley",), value=mmlu, show_progress=False))
    with pytest.raises(InputError, match="not supported with --stream"):
        score_streamed(streamed, random_tokens(), ScoreConfig(metrics=("angular_span",), span=2, show_progress=False))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="convert-gguf"):
        open_streamed(str(gguf))


def test_cli_stream_score_and_bad_budget(sharded_llama: Path, stream_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scores.json"
    common = ["-q", "score", str(sharded_llama), "--data", str(stream_text_file), "--samples", "3", "--seq-len", "16", "--metrics", "cosine,loo_loss"]
    assert main([*common, "--stream", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["definitions"]["loo_loss"]["execution"] == "layer-streamed"
    # The streamed file names the model it was made for, as the in-memory one does
    # (plan and sweep check it; without it they fall back to the layer count).
    in_memory = tmp_path / "in-memory.json"
    assert main([*common, "-o", str(in_memory)]) == 0
    assert doc["config_sha256"] == json.loads(in_memory.read_text())["config_sha256"] is not None
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
    data = random_tokens()
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
