"""Pruning by rewriting safetensors shards equals pruning in memory, tensor for tensor."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import FAMILIES, tiny_model, tiny_tokenizer
from safetensors import safe_open

from depthprune.api import PruneConfig, prune_model
from depthprune.loading import LoadConfig
from depthprune.shard_prune import checkpoint_files


def _tensors(folder: Path) -> dict[str, tuple[torch.dtype, bytes]]:
    files = checkpoint_files(folder) or sorted(folder.glob("model*.safetensors"))
    assert files, f"no weights in {folder}"
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = f.get_tensor(name)
                out[name] = (t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def _config(folder: Path, name: str = "config.json") -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else {}


def assert_same_export(on_disk: Path, in_memory: Path) -> None:
    """Same tensor names, dtypes, shapes and bytes, same config and generation config."""
    a, b = _tensors(on_disk), _tensors(in_memory)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name][:2] == b[name][:2], name
        assert a[name][2] == b[name][2], f"{name} differs"
    assert _config(on_disk) == _config(in_memory)
    assert _config(on_disk, "generation_config.json") == _config(in_memory, "generation_config.json")
    assert _config(on_disk, "depthprune.json") == _config(in_memory, "depthprune.json")


def _both(src: Path, tmp: Path, remove: str, **load: object) -> tuple[Path, Path]:
    """Prune ``src`` on disk (failing if the model gets loaded) and in memory."""
    load_config = LoadConfig(str(src), **load)  # type: ignore[arg-type]
    with mock.patch("depthprune.api.load_model", side_effect=AssertionError("the model was loaded")):
        prune_model(load_config, PruneConfig(out=tmp / "on-disk", remove=remove))
    prune_model(load_config, PruneConfig(out=tmp / "in-memory", remove=remove, rewrite_shards=False))
    return tmp / "on-disk", tmp / "in-memory"


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tied-embedding Llama saved in several shards with its tokenizer."""
    path = tmp_path_factory.mktemp("sharded") / "llama"
    model = tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(path, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(path)
    return path


def test_sharded_model_has_several_shards(sharded_dir: Path) -> None:
    assert len(checkpoint_files(sharded_dir) or []) > 2


@pytest.mark.parametrize("remove", ["block.1", "block.0,block.3", "attn.1,mlp.2", "block.0,attn.2"])
def test_rewrite_equals_in_memory_sharded(sharded_dir: Path, tmp_path: Path, remove: str) -> None:
    on_disk, in_memory = _both(sharded_dir, tmp_path, remove)
    assert_same_export(on_disk, in_memory)
    # A sharded source gives a sharded output whose index covers every tensor.
    index = next(on_disk.glob("model.safetensors.index*.json"))
    weight_map = json.loads(index.read_text())["weight_map"]
    assert sorted(weight_map) == sorted(_tensors(on_disk))


@pytest.mark.parametrize("family", FAMILIES)
def test_rewrite_equals_in_memory_families(family: str, tmp_path: Path) -> None:
    """Per-layer config lists (layer_types, max_window_layers...) are edited as in memory."""
    src = tmp_path / "src"
    tiny_model(family).save_pretrained(src)
    on_disk, in_memory = _both(src, tmp_path, "block.1,block.2")
    assert_same_export(on_disk, in_memory)


def test_rewrite_casts_like_loading(sharded_dir: Path, tmp_path: Path) -> None:
    on_disk, in_memory = _both(sharded_dir, tmp_path, "block.2", dtype="bfloat16")
    assert_same_export(on_disk, in_memory)
    assert {d for d, *_ in _tensors(on_disk).values()} == {torch.bfloat16}


def test_rewrite_is_loadable_and_computes_like_in_memory(sharded_dir: Path, tmp_path: Path) -> None:
    from depthprune.pruned_classes import load

    on_disk, in_memory = _both(sharded_dir, tmp_path, "block.1,attn.2")
    ids = torch.tensor([[1, 5, 9, 4, 7]])
    with torch.no_grad():
        a = load(on_disk).forward(ids).logits
        b = load(in_memory).forward(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.real
def test_rewrite_equals_in_memory_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    on_disk, in_memory = _both(smollm2_dir, tmp_path, "block.3,block.17,attn.20")
    assert_same_export(on_disk, in_memory)
