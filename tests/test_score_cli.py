"""`depthprune score` end to end on stories260K, and its bad-input handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from depthprune.cli import main


def test_score_cli_writes_scores_json_and_plot(stories_dir: Path, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "scores.json", tmp_path / "scores.png"
    data = shared / "data" / "tinystories" / "tinystories_sample.txt"
    argv = ["score", str(stories_dir), "--data", str(data), "--samples", "4", "--seq-len", "64"]
    argv += ["--metrics", "cosine,angular,rel_l1,rel_l2,angular_span,loo_loss,loo_kl", "--span", "2", "-o", str(out), "--plot", str(png)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert set(doc) == {"model", "family", "n_layers", "config_sha256", "calibration", "scores", "stderr", "definitions", "meta"}
    assert doc["family"] == "llama" and doc["n_layers"] == 5
    cal = doc["calibration"]
    assert (cal["n_sequences"], cal["seq_len"], cal["n_tokens"]) == (4, 64, 256) and len(cal["sha256"]) == 64
    assert set(doc["scores"]["cosine"]) == {f"{k}.{i}" for k in ("block", "attn", "mlp") for i in range(5)}
    assert set(doc["scores"]["angular_span"]) == {f"block.{i}" for i in range(4)}
    assert doc["definitions"]["angular_span"]["span"] == 2
    assert all("reference" in d and "definition" in d for d in doc["definitions"].values())
    assert doc["meta"]["cost"]["loo_layer_evals"] > 0
    # The static metrics agree that block.0 matters most of the blocks on this model.
    for metric in ("cosine", "rel_l2", "loo_loss"):
        blocks = {u: v for u, v in doc["scores"][metric].items() if u.startswith("block.")}
        assert max(blocks, key=blocks.get) == "block.0", metric
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rank" in printed and f"wrote {out}" in printed


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--metrics", "cosin"], "Did you mean: cosine?"),
        (["--units", "blocks"], "Did you mean: block?"),
    ],
)
def test_score_cli_bad_input(
    extra: list[str], needle: str, stories_dir: Path, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores.json"
    data = shared / "data" / "tinystories" / "tinystories_sample.txt"
    assert main(["score", str(stories_dir), "--data", str(data), *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not out.exists()


def test_score_cli_data_shorter_than_a_sequence(stories_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    assert main(["score", str(stories_dir), "--data", str(short), "--seq-len", "64", "-o", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shorter than one sequence of 64" in err[0]
    assert not (tmp_path / "s.json").exists()


def test_score_cli_empty_data(stories_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["score", str(stories_dir), "--data", str(empty), "-o", str(tmp_path / "s.json")]) == 2
    assert "holds no text" in capsys.readouterr().err
