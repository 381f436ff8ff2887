"""GGUF export (`prune --format gguf`): layout, tensors, tokenizer, refusals.

These tests need no llama.cpp: they read the file back with the gguf package and with
transformers' GGUF loader (which undoes llama.cpp's query/key row order), so a wrong
permutation, a missing tensor or a wrong per-layer array fails here. The tests that run
the files in llama.cpp itself are in ``test_gguf_llamacpp.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from depthprune.api import PruneConfig, prune_model
from depthprune.cli import main
from depthprune.errors import InputError
from depthprune.gguf_export import MANIFEST_KEY, ZERO_FFN, write_gguf
from depthprune.loading import LoadConfig, load_model
from depthprune.prune import prune_
from depthprune.pruned_classes import to_depthpruned_
from depthprune.units import Unit, mask_units

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 8, 120]])


def _read(path: Path) -> Any:
    import gguf

    return gguf.GGUFReader(path)


def _field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def _prune(src: Path, out: Path, remove: str, **kwargs: Any) -> Path:
    prune_model(LoadConfig(str(src), dtype="float32"), PruneConfig(out=out, remove=remove, export_format="gguf", **kwargs))
    return out


def test_block_pruned_model_is_standard_llama_and_reloads_exactly(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = _prune(tiny_model_dirs["llama"], tmp_path / "m.gguf", "block.1")
    reader = _read(out)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 3
    assert _field(reader, "llama.attention.head_count") == 4 and _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(_field(reader, "tokenizer.ggml.tokens")) == 320
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.2.attn_q.weight", "blk.2.ffn_down.weight"} <= names
    assert not any(n.startswith("blk.3.") for n in names)
    assert '"removed": ["block.1"]' in _field(reader, MANIFEST_KEY)

    # transformers' GGUF loader reverses llama.cpp's query/key row order: the reload is
    # the pruned model itself, bit for bit in f32 (same weights, same graph).
    source = load_model(str(tiny_model_dirs["llama"]), dtype="float32").model
    back = load_model(str(out), dtype="float32").model
    with torch.no_grad(), mask_units(source, [Unit("block", 1)]):
        torch.testing.assert_close(back(IDS).logits, source(IDS).logits, rtol=0, atol=1e-6)


def test_sublayer_pruned_model_is_deci_with_per_layer_arrays(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = _prune(tiny_model_dirs["llama"], tmp_path / "m.gguf", "attn.0,block.2,attn.3,mlp.3")
    reader = _read(out)
    assert _field(reader, "general.architecture") == "deci"
    assert _field(reader, "deci.block_count") == 3
    # Layers after deleting block.2: original 0, 1, 3. Layer 0's attention is written as a
    # zero "linear attention" (heads 4, KV heads 0): llama.cpp takes the head size from layer 0.
    assert list(_field(reader, "deci.attention.head_count")) == [4, 4, 0]
    assert list(_field(reader, "deci.attention.head_count_kv")) == [0, 2, 0]
    assert list(_field(reader, "deci.feed_forward_length")) == [64, 64, 0]
    assert _field(reader, "deci.attention.key_length") == 8 and _field(reader, "deci.rope.dimension_count") == 8
    data = {t.name: np.array(t.data) for t in reader.tensors}
    assert not any(n.startswith(("blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v", "blk.2.attn", "blk.2.ffn")) for n in data)
    assert {"blk.0.ffn_norm.weight", "blk.0.ffn_up.weight", "blk.1.attn_norm.weight", "blk.1.attn_k.weight"} <= set(data)
    assert data["blk.0.attn_output.weight"].shape == (32, 32) and not data["blk.0.attn_output.weight"].any()


def test_a_layer_without_its_mlp_gets_a_zero_stand_in(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """``mlp.i`` with ``attn.i`` kept: a declared width of 0 would make llama.cpp skip the attention."""
    out = _prune(tiny_model_dirs["llama"], tmp_path / "m.gguf", "mlp.1,block.2")
    reader = _read(out)
    assert list(_field(reader, "deci.feed_forward_length")) == [64, ZERO_FFN, 64]
    assert list(_field(reader, "deci.attention.head_count")) == [4, 4, 4]
    data = {t.name: np.array(t.data) for t in reader.tensors}
    for name in ("ffn_gate", "ffn_up", "ffn_down"):
        stand_in = data[f"blk.1.{name}.weight"]
        assert ZERO_FFN in stand_in.shape and not stand_in.any()
    assert data["blk.1.attn_k.weight"].any() and data["blk.2.ffn_down.weight"].any()


@pytest.mark.parametrize(("gguf_type", "ggml"), [("f16", "F16"), ("bf16", "BF16")])
def test_half_types_halve_the_matrices_and_keep_norms_f32(
    gguf_type: str, ggml: str, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    f32 = _prune(tiny_model_dirs["llama"], tmp_path / "a.gguf", "block.1")
    half = _prune(tiny_model_dirs["llama"], tmp_path / "b.gguf", "block.1", gguf_type=gguf_type)
    types = {t.name: t.tensor_type.name for t in _read(half).tensors}
    assert types["blk.0.attn_q.weight"] == ggml and types["token_embd.weight"] == ggml
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert _field(_read(half), "general.file_type") == {"f16": 1, "bf16": 32}[gguf_type]
    assert half.stat().st_size < 0.6 * f32.stat().st_size
    # Values survive to the type's precision (8 bits of mantissa for bf16, 11 for f16).
    a = {t.name: np.array(t.data) for t in _read(f32).tensors}["blk.0.ffn_up.weight"]
    b = load_model(str(half), dtype="float32").model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert np.allclose(a, b, rtol={"f16": 1e-3, "bf16": 8e-3}[gguf_type], atol=1e-6)


def test_biases_of_folded_models_are_written(tmp_path: Path) -> None:
    from conftest import tiny_model, tiny_tokenizer

    model = tiny_model("llama", attention_bias=True, mlp_bias=True)
    out = write_gguf(model, tmp_path / "b.gguf", tokenizer=tiny_tokenizer())
    data = {t.name: np.array(t.data) for t in _read(out).tensors}
    assert {"blk.0.attn_output.bias", "blk.0.attn_v.bias", "blk.0.ffn_down.bias", "blk.3.ffn_up.bias"} <= set(data)
    layer = model.model.layers[3]
    assert np.array_equal(data["blk.3.ffn_down.bias"], layer.mlp.down_proj.bias.detach().numpy())
    # The query bias follows its rows: head h's element j goes to 2j, element d/2 + j to 2j + 1.
    q = layer.self_attn.q_proj.bias.detach().numpy().reshape(4, 2, 4)  # (heads, halves, d/2)
    assert np.array_equal(data["blk.3.attn_q.bias"], q.transpose(0, 2, 1).reshape(-1))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--remove", "block.1", "--format", "gguf", "--gguf-type", "q4_0"], "unknown GGUF type 'q4_0'"),
        (["--remove", "block.1", "--gguf-type", "f16"], "applies to --format gguf only"),
        (["--remove", "attn.1", "--recover", "lowrank:4", "--heldout", "0", "--data", "TEXT", "--format", "gguf"], "cannot express emulators"),
    ],
)
def test_bad_gguf_exports_exit_2_with_one_line(
    argv: list[str], needle: str, tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    argv = [str(text) if a == "TEXT" else a for a in argv]
    out = tmp_path / "o.gguf"
    assert main(["prune", str(tiny_model_dirs["llama"]), *argv, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == [text]


def test_gguf_refuses_other_families(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="gguf format is written for the llama, mistral families; this model is 'gpt2'"):
        _prune(tiny_model_dirs["gpt2"], tmp_path / "g.gguf", "block.1")
    with pytest.raises(InputError, match="sliding-window attention"):
        _prune(tiny_model_dirs["mistral"], tmp_path / "m.gguf", "block.1")
    assert list(tmp_path.iterdir()) == []


def test_exports_larger_than_the_free_disk_are_refused(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import depthprune._fs as fs
    import depthprune.gguf_export as ge

    out = tmp_path / "big.gguf"
    _prune(tiny_model_dirs["llama"], out, "block.1")
    size = out.stat().st_size
    out.unlink()
    model = load_model(str(tiny_model_dirs["llama"]), dtype="float32")
    prune_(model.model, [Unit("block", 1)], model.spec)
    estimate = ge.estimate_gguf_bytes(model.model, model.spec, "f32", model.tokenizer)
    # The estimate is an upper bound that stays close: within the 1 MiB header slack.
    assert size <= estimate <= size + (2 << 20)
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fs.shutil, "disk_usage", lambda p: real._replace(free=estimate - 1))
    with pytest.raises(InputError, match=r"needs about 0\.00 GiB but .* free; free some space or write elsewhere"):
        _prune(tiny_model_dirs["llama"], out, "block.1")
    # The safetensors formats check too: 1 KiB free is less than any checkpoint.
    monkeypatch.setattr(fs.shutil, "disk_usage", lambda p: real._replace(free=1024))
    config = PruneConfig(out=tmp_path / "hf", remove="attn.1")
    with pytest.raises(InputError, match="the export needs about"):
        prune_model(LoadConfig(str(tiny_model_dirs["llama"])), config)
    assert list(tmp_path.iterdir()) == []


def test_an_emulator_that_stays_a_module_is_refused(tmp_path: Path) -> None:
    from conftest import tiny_model, tiny_tokenizer

    from depthprune.recover.emulators import BiasEmulator

    model = tiny_model("llama")
    to_depthpruned_(model, {Unit("mlp", 1): BiasEmulator.empty(32), Unit("attn", 1): None})
    with pytest.raises(InputError, match=r"cannot express emulators that stay modules \(mlp\.1 -> bias\)"):
        write_gguf(model, tmp_path / "e.gguf", tokenizer=tiny_tokenizer())
    assert list(tmp_path.iterdir()) == []
