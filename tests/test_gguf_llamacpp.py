"""GGUF exports run in llama.cpp itself (through llama-cpp-python, the ``serve`` extra).

llama.cpp's logits on short prompts are compared with our masked in-memory model, and
greedy continuations must be equal. Both compute in float32 from the same float32 weights,
with llama.cpp's KV cache in float32 too (its default is float16); llama.cpp adds in a
different order (blocked SIMD dot products, its own RMSNorm, softmax and RoPE), so logits
differ by float32 rounding. See ``LOGIT_TOL`` for the bound and what was measured.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from depthprune.api import PruneConfig, prune_model
from depthprune.gguf_export import write_gguf
from depthprune.loading import LoadConfig, load_model
from depthprune.pruned_classes import to_depthpruned_
from depthprune.units import Unit, mask_units, parse_units

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed; `pip install -c constraints.txt -e '.[serve]'` (CI installs it)",
)

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, a little"]
N_NEW = 8
# Max |llama.cpp - torch| over all positions and the vocabulary, as a fraction of the
# largest |logit| of the reference. Measured on SmolLM2-135M (logits up to ~37, residual
# activations up to ~2e4): 2.8e-6 to 2.4e-5 relative in the cases below (8.6e-4 absolute at
# most); the worst seen, 1.5e-3 absolute (4.6e-5 relative, attn.0 and attn.6 removed), is at
# the one position where torch's own float32 result is as far (1.5e-3) from a float64 run.
# 5e-4 leaves a 10x margin for other CPUs' SIMD paths and stays far below what a wrong
# graph gives: a dropped attention moves logits by 5% or more of the scale (the tiny test
# below), and SmolLM2 written without the query/key row reordering is off by 41-47%.
# (With llama.cpp's default float16 KV cache the same file differs by up to 0.9, 2.7%.)
LOGIT_TOL = 5e-4
_GGML_F32 = 0  # ggml_type of the KV cache


def _llama(path: Path) -> Any:
    return llama_cpp.Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=64,
        n_threads=min(2, os.cpu_count() or 1),
        type_k=_GGML_F32,
        type_v=_GGML_F32,
        verbose=False,
    )


def _llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)


def _llama_greedy(llm: Any, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """``n`` greedy tokens after ``ids``, and the logits at every position of the result."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out, np.array(llm.scores[: llm.n_tokens], dtype=np.float32)  # (T + n, V)


def _torch_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # (T, V)


def _relative_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize(("removed", "arch"), [((), "llama"), ((Unit("attn", 1),), "deci")])
def test_folded_biases_run_in_llamacpp(removed: tuple[Unit, ...], arch: str, tmp_path: Path) -> None:
    """A checkpoint with bias flags on (what folded emulators become) runs with its biases."""
    from conftest import tiny_model, tiny_tokenizer

    model = tiny_model("llama", attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.o_proj, layer.self_attn.q_proj, layer.mlp.down_proj, layer.mlp.up_proj):
                proj.bias.normal_(0, 0.5)
    ids = [5, 17, 99, 3, 250, 41]
    with mask_units(model, removed):
        ours = _torch_logits(model, ids)
    if removed:
        to_depthpruned_(model, dict.fromkeys(removed))
    path = write_gguf(model, tmp_path / "bias.gguf", tokenizer=tiny_tokenizer())
    llm = _llama(path)
    assert llm.metadata["general.architecture"] == arch
    assert _relative_diff(ours, _llama_logits(llm, ids)) < LOGIT_TOL


@pytest.mark.parametrize("recover", ["bias", "linear:4"])
def test_folded_emulators_export_as_gguf_and_match(recover: str, tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """``prune --recover bias|linear:R --format gguf``: the folded model, written through the same path."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and the cat sat on the mat. " * 60)
    common: dict[str, Any] = {"remove": "block.2", "recover": recover, "data": str(text), "n_samples": 4, "seq_len": 32}
    common["heldout"] = 0.0  # keep the emulator whether or not it helps this random model
    load = LoadConfig(str(tiny_model_dirs["llama"]), dtype="float32")
    prune_model(load, PruneConfig(out=tmp_path / "hf", **common))
    prune_model(load, PruneConfig(out=tmp_path / "m.gguf", export_format="gguf", **common))
    folded = load_model(str(tmp_path / "hf"), dtype="float32").model
    assert type(folded).__name__ == "LlamaForCausalLM"  # folded: a standard checkpoint
    ids = [5, 17, 99, 3, 250, 41]
    ours = _torch_logits(folded, ids)
    unfolded = _torch_logits(load_model(str(tiny_model_dirs["llama"]), dtype="float32").model, ids)
    assert _relative_diff(unfolded, ours) > 0.01  # the fold changed the model
    assert _relative_diff(ours, _llama_logits(_llama(tmp_path / "m.gguf"), ids)) < LOGIT_TOL


def test_llamacpp_drops_the_attention_of_a_layer_without_mlp(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Why ``--format gguf`` writes a zero MLP for ``mlp.i`` without ``attn.i``.

    Declared with a feed-forward length of 0, the layer is skipped whole by llama.cpp's
    deci graph, attention included; with the zero stand-in it runs as our masked model.
    When the first half fails, llama.cpp has fixed its ``n_ff == 0`` path and the stand-in
    in :func:`depthprune.gguf_export._as_written` can go.
    """
    lm = load_model(str(tiny_model_dirs["llama"]), dtype="float32")
    ids = [5, 17, 99, 3, 250, 41]
    with torch.no_grad():
        with mask_units(lm.model, [Unit("mlp", 1)]):
            mlp_only = lm.model(torch.tensor([ids])).logits[0].numpy()
        with mask_units(lm.model, [Unit("block", 1)]):
            whole_block = lm.model(torch.tensor([ids])).logits[0].numpy()
    assert _relative_diff(whole_block, mlp_only) > 0.05  # the attention of layer 1 matters
    to_depthpruned_(lm.model, {Unit("mlp", 1): None}, lm.spec)
    path = write_gguf(lm.model, tmp_path / "mlp1.gguf", tokenizer=lm.tokenizer, ffn_stand_in=False)
    theirs = _llama_logits(_llama(path), ids)
    assert _relative_diff(whole_block, theirs) < LOGIT_TOL
    assert _relative_diff(mlp_only, theirs) > 0.05
    fixed = write_gguf(lm.model, tmp_path / "mlp1-stand-in.gguf", tokenizer=lm.tokenizer)
    llm = _llama(fixed)
    assert llm.metadata["general.architecture"] == "deci"
    assert _relative_diff(mlp_only, _llama_logits(llm, ids)) < LOGIT_TOL


def test_stories260k_sentencepiece_vocab_and_logits(stories_dir: Path, stories_lm: Any, tmp_path: Path) -> None:
    """A SentencePiece-style vocabulary (llama.cpp's ``llama`` tokenizer) and a removed ``attn.0``."""
    path = tmp_path / "stories.gguf"
    remove = "attn.0,attn.2"
    prune_model(LoadConfig(str(stories_dir), dtype="float32"), PruneConfig(out=path, remove=remove, export_format="gguf"))
    llm = _llama(path)
    assert llm.metadata["tokenizer.ggml.model"] == "llama"
    for prompt in ["Once upon a time, there was a little girl", "The cat sat on the mat."]:
        ids = stories_lm.tokenizer(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
        new, theirs = _llama_greedy(llm, ids, N_NEW)
        with mask_units(stories_lm.model, parse_units(remove.split(","))):
            ours = _torch_logits(stories_lm.model, ids + new)
        assert ours[len(ids) - 1 : -1].argmax(-1).tolist() == new
        assert _relative_diff(ours, theirs) < LOGIT_TOL


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def _two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, min(2, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(before)


CASES = {
    "blocks": "block.4,block.17,block.25",
    "attention": "attn.0,attn.6,attn.13,attn.21",
    "mlp": "mlp.3,mlp.11,mlp.26",  # attention kept: written with zero stand-in MLPs
}


@pytest.mark.real
@pytest.mark.parametrize("case", sorted(CASES))
def test_smollm2_exports_match_llamacpp(
    case: str, smollm2_dir: Path, smollm2_lm: Any, tmp_path: Path, _two_threads: None
) -> None:
    units = parse_units(CASES[case].split(","))
    path = tmp_path / f"{case}.gguf"
    prune_model(LoadConfig(str(smollm2_dir), dtype="float32"), PruneConfig(out=path, remove=CASES[case], export_format="gguf"))
    llm = _llama(path)
    arch = llm.metadata["general.architecture"]
    assert arch == ("llama" if case == "blocks" else "deci")
    tokenizer = smollm2_lm.tokenizer
    diffs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        # The embedded tokenizer splits text as the Hugging Face one does.
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
        new, theirs = _llama_greedy(llm, ids, N_NEW)
        # One forward over prompt + llama.cpp's continuation: our greedy continuation is
        # the same exactly when our argmax at each step is llama.cpp's next token.
        with mask_units(smollm2_lm.model, units):
            ours = _torch_logits(smollm2_lm.model, ids + new)
        assert ours[len(ids) - 1 : -1].argmax(-1).tolist() == new, prompt
        diffs.append(_relative_diff(ours, theirs))
        print(f"{case} {prompt!r}: max |diff| {np.abs(ours - theirs).max():.2e}, max |logit| {np.abs(ours).max():.1f}")
    assert max(diffs) < LOGIT_TOL
