"""The self-made testbed: a deterministic corpus and a model that learns it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from depthprune.errors import InputError
from depthprune.testbed import TestbedConfig, build_testbed, generate_corpus


def test_corpus_is_deterministic_and_refers_back_to_names() -> None:
    a, b = generate_corpus(50, seed=1), generate_corpus(50, seed=1)
    assert a == b and a != generate_corpus(50, seed=2)
    for story in a:
        name = story.split("named ")[1].split(".")[0]
        assert story.count(name) >= 3, story


def test_tiny_testbed_trains_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tmp_path / "cache"))
    config = TestbedConfig(layers=2, hidden=32, steps=150, n_stories=300, batch=8, seq_len=64)
    path = build_testbed(config, show_progress=False)
    summary = json.loads((path / "testbed.json").read_text())
    # A uniform guess over the vocabulary costs ln(512) = 6.2 nats per token.
    assert summary["held_out_loss"] < 3.5, summary
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_testbed(config, show_progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 2 and tok.decode(tok("Once upon a time").input_ids, skip_special_tokens=True) == "Once upon a time"
    with pytest.raises(InputError, match="at least 2 layers"):
        TestbedConfig(layers=1)
