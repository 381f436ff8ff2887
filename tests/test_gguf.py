"""GGUF input: convert-gguf, loading a .gguf wherever a model is taken, and bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import one_line_error
from safetensors import safe_open

from depthprune.cli import main
from depthprune.errors import ModelLoadError
from depthprune.gguf_import import load_gguf_config, read_gguf_header
from depthprune.loading import load_config, load_model, resolve_local

PROMPT = "The capital of France is"

_PLAIN_LOAD = """
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, prompt, out = sys.argv[1:]
torch.set_num_threads(1)  # the same reduction order as the test process
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
torch.save({"ids": ids, "logits": logits, "quantized": bool(getattr(model, "is_quantized", False)),
            "depthprune": "depthprune" in sys.modules}, out)
"""


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def prompt_ids(smollm2_lm: Any) -> torch.Tensor:
    return smollm2_lm.tokenizer(PROMPT, return_tensors="pt").input_ids  # (1, 5)


# --------------------------------------------------------------------------- the real model


@pytest.mark.real
def test_converted_folder_is_plain_safetensors(smollm2_dir: Path) -> None:
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".gguf")) or n.startswith(".")]
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys  # tied: stored once
    assert len(keys) == 2 + 9 * 30  # embedding, final norm, 9 tensors per layer


@pytest.mark.real
def test_converted_logits_equal_transformers_gguf_load(smollm2_gguf: Path, smollm2_lm: Any, prompt_ids: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).eval()
    torch.testing.assert_close(_logits(smollm2_lm.model, prompt_ids), _logits(reference, prompt_ids), atol=1e-5, rtol=0)


@pytest.mark.real
def test_greedy_continuation_is_paris(smollm2_lm: Any, prompt_ids: torch.Tensor) -> None:
    tokenizer = smollm2_lm.tokenizer
    with torch.no_grad():
        out = smollm2_lm.model.generate(prompt_ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, prompt_ids.shape[1] :]).startswith(" Paris")


@pytest.mark.real
def test_plain_transformers_loads_converted_folder(smollm2_dir: Path, smollm2_lm: Any, tmp_path: Path) -> None:
    script = tmp_path / "plain_load.py"
    script.write_text(_PLAIN_LOAD)
    out = tmp_path / "plain.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(script), str(smollm2_dir), PROMPT, str(out)], check=True, env=env, capture_output=True)
    got = torch.load(out)
    assert not got["depthprune"] and not got["quantized"]
    # Another process may pick other kernels: allow float32 rounding noise (logits are ~10).
    torch.testing.assert_close(got["logits"], _logits(smollm2_lm.model, got["ids"]), atol=1e-4, rtol=0)


@pytest.mark.real
def test_load_model_reads_gguf_directly(smollm2_gguf: Path, smollm2_lm: Any, prompt_ids: torch.Tensor) -> None:
    loaded = load_model(str(smollm2_gguf))
    assert loaded.source == str(smollm2_gguf) and loaded.local_dir == smollm2_gguf.parent
    assert loaded.spec.family == smollm2_lm.spec.family and loaded.n_layers == 30
    assert not getattr(loaded.model, "is_quantized", False)
    assert getattr(loaded.model.config, "quantization_config", None) is None
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert loaded.tokenizer(PROMPT).input_ids == prompt_ids[0].tolist()
    torch.testing.assert_close(_logits(loaded.model, prompt_ids), _logits(smollm2_lm.model, prompt_ids), atol=1e-5, rtol=0)


@pytest.mark.real
def test_config_and_resolve_local_of_gguf(smollm2_gguf: Path) -> None:
    config, local = load_config(str(smollm2_gguf))
    assert local == smollm2_gguf.parent
    assert type(config).__name__ == "LlamaConfig" and config.num_hidden_layers == 30
    assert getattr(config, "quantization_config", None) is None
    assert resolve_local(str(smollm2_gguf)) == smollm2_gguf
    # Cached parses are copies: changing one does not change the next.
    config.num_hidden_layers = 1
    assert load_gguf_config(smollm2_gguf).num_hidden_layers == 30


@pytest.mark.real
def test_score_cli_on_gguf(smollm2_gguf: Path, shared: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    data = shared / "data" / "wikitext-2-raw" / "wiki.test.raw"
    argv = ["-q", "score", str(smollm2_gguf), "--data", str(data), "--samples", "1", "--seq-len", "32"]
    assert main([*argv, "--metrics", "cosine", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == str(smollm2_gguf)
    cosine = doc["scores"]["cosine"]
    assert len(cosine) == 90 and {"block.0", "attn.29", "mlp.29"} <= set(cosine)
    assert all(np.isfinite(v) for v in cosine.values())


@pytest.mark.real
@pytest.mark.slow  # one more dequantization of the whole file
def test_convert_bfloat16(smollm2_gguf: Path, smollm2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    assert main(["convert-gguf", str(smollm2_gguf), "-o", str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as bf16, safe_open(smollm2_dir / "model.safetensors", "pt") as fp32:
        assert set(bf16.keys()) == set(fp32.keys())
        for key in bf16.keys():
            assert torch.equal(bf16.get_tensor(key), fp32.get_tensor(key).to(torch.bfloat16)), key


# --------------------------------------------------------------------------- bad input


def _inputs(tmp_path: Path) -> Path:
    """A folder for input files: an output beside a model file would be in its model folder."""
    folder = tmp_path / "inputs"
    folder.mkdir(exist_ok=True)
    return folder


def _nothing_written(folder: Path, *keep: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)


def _write_gguf(path: Path, arch: str, alignment: int | None = None, **kv: Any) -> Path:
    """A small GGUF file of ``arch`` with one tensor (enough metadata for transformers' reader)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_vocab_size(100)
    for key, value in kv.items():
        writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((100, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.real
def test_truncated_gguf(smollm2_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = smollm2_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    code = main(["convert-gguf", str(cut), "-o", str(tmp_path / "out")])
    one_line_error(code, capsys, "cut.gguf", "is truncated", f"need {len(data)} bytes", f"has {len(data) // 2}")
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:1000])
    code = main(["score", str(head), "--data", str(cut), "-o", str(tmp_path / "s.json")])
    one_line_error(code, capsys, "head.gguf", "ends inside its header")
    _nothing_written(tmp_path, "cut.gguf", "head.gguf")


@pytest.mark.real
def test_convert_never_replaces_the_gguf(smollm2_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "model.gguf"
    os.link(smollm2_gguf, copy) if smollm2_gguf.stat().st_dev == tmp_path.stat().st_dev else copy.write_bytes(smollm2_gguf.read_bytes())
    for out in (copy, tmp_path):
        code = main(["convert-gguf", str(copy), "-o", str(out), "--force"])
        one_line_error(code, capsys, "refusing", "model.gguf")
    code = main(["prune", str(copy), "--remove", "block.3", "-o", str(copy), "--force"])
    one_line_error(code, capsys, "refusing", "source model")
    _nothing_written(tmp_path, "model.gguf")
    assert copy.stat().st_size == smollm2_gguf.stat().st_size


def test_unsupported_gguf_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write_gguf(_inputs(tmp_path) / "bert.gguf", "bert")
    code = main(["convert-gguf", str(bad), "-o", str(tmp_path / "out")])
    one_line_error(code, capsys, "bert.gguf", "architecture 'bert'", "not supported", "llama")
    code = main(["prune", str(bad), "--remove", "block.0", "-o", str(tmp_path / "out")])
    one_line_error(code, capsys, "architecture 'bert'")
    _nothing_written(tmp_path, "inputs")


def test_gguf_of_a_family_depthprune_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write_gguf(_inputs(tmp_path) / "falcon.gguf", "falcon")
    code = main(["convert-gguf", str(bad), "-o", str(tmp_path / "out")])
    one_line_error(code, capsys, "unsupported architecture 'FalconForCausalLM'", "DEPTHPRUNE_ARCH_PATH")
    _nothing_written(tmp_path, "inputs")


def test_gguf_that_is_not_a_causal_lm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    encoder = _write_gguf(_inputs(tmp_path) / "t5encoder.gguf", "t5encoder")
    code = main(["convert-gguf", str(encoder), "-o", str(tmp_path / "out")])
    one_line_error(code, capsys, "t5encoder.gguf", "'t5encoder'", "not a causal (decoder-only) language model")
    with pytest.raises(ModelLoadError, match="not a causal"):
        load_model(str(encoder))
    _nothing_written(tmp_path, "inputs")


def test_missing_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["convert-gguf", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "out")])
    one_line_error(code, capsys, "nope.gguf", "does not exist")
    code = main(["eval", str(tmp_path / "nope.gguf"), "--task", "ppl:x.txt", "--json", str(tmp_path / "e.json")])
    one_line_error(code, capsys, "GGUF file", "does not exist")
    _nothing_written(tmp_path)


def test_file_that_is_not_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _inputs(tmp_path) / "notes.gguf"
    text.write_text("hello world\n" * 10)
    empty = _inputs(tmp_path) / "empty.gguf"
    empty.touch()
    for bad in (text, empty):
        code = main(["convert-gguf", str(bad), "-o", str(tmp_path / "out")])
        one_line_error(code, capsys, bad.name, "is not a GGUF file")
        code = main(["prune", str(bad), "--remove", "block.0", "-o", str(tmp_path / "out")])
        one_line_error(code, capsys, bad.name, "is not a GGUF file")
    _nothing_written(tmp_path, "inputs")


def test_gguf_without_its_extension(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    named = _write_gguf(_inputs(tmp_path) / "model.bin", "llama")
    code = main(["prune", str(named), "--remove", "block.0", "-o", str(tmp_path / "out")])
    one_line_error(code, capsys, "GGUF file without the .gguf extension")


def test_header_reader_on_small_files(tmp_path: Path) -> None:
    good = _write_gguf(tmp_path / "falcon.gguf", "falcon", alignment=64)
    header = read_gguf_header(good)
    assert (header.architecture, header.name, header.n_tensors, header.version) == ("falcon", "tiny falcon", 1, 3)
    assert header.data_end == header.size
    data = good.read_bytes()
    for n in (len(data) - 1, len(data) - 320, 40, 5):
        (tmp_path / "cut.gguf").write_bytes(data[:n])
        with pytest.raises(ModelLoadError, match="truncated"):
            read_gguf_header(tmp_path / "cut.gguf")
    split = _write_gguf(tmp_path / "part.gguf", "llama", **{"split.count": 3})
    with pytest.raises(ModelLoadError, match="split into 3 files"):
        read_gguf_header(split)


@pytest.mark.real
def test_relative_gguf_path_loads_config_and_tokenizer(smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers joins gguf_file onto the folder: a relative path given as a whole once
    # lost the tokenizer (and so every stage's calibration) when run from another folder.
    from depthprune.gguf_import import (
        _load_tokenizer,
        load_gguf_config,
        read_gguf_header,
    )

    monkeypatch.chdir(smollm2_gguf.parent.parent.parent)
    relative = Path(*smollm2_gguf.parts[-3:])
    config = load_gguf_config(relative)
    tokenizer = _load_tokenizer(read_gguf_header(relative), config)
    assert tokenizer is not None and tokenizer("The capital of France is").input_ids[:2] == [504, 3575]
