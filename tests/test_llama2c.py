"""Tests for the llama2.c converter against the real stories260K model.

The reference encoder and forward pass below are written from the llama2.c description in
``shared/models/stories260K/README.md``, independently of ``depthprune.llama2c``.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from depthprune.errors import CheckpointError, InputError, OutputExistsError
from depthprune.llama2c import (
    convert_llama2c,
    read_llama2c_checkpoint,
    read_llama2c_tokenizer,
)


def _shared_dir() -> Path:
    env = os.environ.get("DEPTHPRUNE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


SHARED = _shared_dir()
MODEL_DIR = SHARED / "models" / "stories260K"
CKPT = MODEL_DIR / "stories260K.bin"
TOK = MODEL_DIR / "tok512.bin"
SAMPLE = SHARED / "data" / "tinystories" / "tinystories_sample.txt"

if not (CKPT.is_file() and TOK.is_file() and SAMPLE.is_file()):
    pytest.skip(
        f"stories260K or the TinyStories sample not found under {SHARED} (set DEPTHPRUNE_SHARED to the shared folder)",
        allow_module_level=True,
    )


# ----------------------------------------------------------------- reference llama2.c code


def _ref_vocab() -> tuple[list[str], list[float]]:
    data = TOK.read_bytes()
    pos, pieces, scores = 4, [], []
    while pos < len(data):
        score, n = struct.unpack_from("<fi", data, pos)
        pieces.append(data[pos + 8 : pos + 8 + n].decode("utf-8"))
        scores.append(score)
        pos += 8 + n
    return pieces, scores


def _ref_encode(text: str, pieces: list[str], scores: list[float]) -> list[int]:
    """llama2.c ``encode`` without BOS/EOS: dummy prefix, chars or bytes, best-score merges."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [lookup[" "]] if text else []
    for ch in text:
        if ch in lookup:
            tokens.append(lookup[ch])
        else:
            tokens.extend(b + 3 for b in ch.encode("utf-8"))
    while True:
        best_score, best_idx, best_id = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:  # strict: leftmost wins ties
                best_score, best_idx, best_id = scores[merged], i, merged
        if best_idx < 0:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


def _ref_weights() -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    raw = CKPT.read_bytes()
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    c = dict(zip(names, struct.unpack_from("<7i", raw, 0), strict=True))
    d, f, n_layers, v = c["dim"], c["hidden_dim"], c["n_layers"], c["vocab_size"]
    kv = d // c["n_heads"] * c["n_kv_heads"]
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=28).copy())
    shapes = {
        "emb": (v, d), "rms_att": (n_layers, d), "wq": (n_layers, d, d), "wk": (n_layers, kv, d),
        "wv": (n_layers, kv, d), "wo": (n_layers, d, d), "rms_ffn": (n_layers, d), "w1": (n_layers, f, d),
        "w2": (n_layers, d, f), "w3": (n_layers, f, d), "rms_final": (d,),
    }  # fmt: skip
    w, off = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        w[name] = flat[off : off + n].reshape(shape)
        off += n
    return c, w


def _ref_forward(ids: list[int]) -> torch.Tensor:
    """Logits (T, V) computed the way llama2.c's run.c does, in float64 for a firm reference."""
    c, w = _ref_weights()
    w = {k: t.double() for k, t in w.items()}
    n_heads, n_kv, hd = c["n_heads"], c["n_kv_heads"], c["dim"] // c["n_heads"]
    T = len(ids)

    def rmsnorm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g

    def rope(x: torch.Tensor) -> torch.Tensor:  # (T, heads, hd), rotating pairs (0,1), (2,3), ...
        freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * freq  # (T, hd/2)
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)

    x = w["emb"][torch.tensor(ids)]  # (T, D)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(c["n_layers"]):
        h = rmsnorm(x, w["rms_att"][layer])
        q = rope((h @ w["wq"][layer].T).view(T, n_heads, hd))
        k = rope((h @ w["wk"][layer].T).view(T, n_kv, hd))
        v = (h @ w["wv"][layer].T).view(T, n_kv, hd)
        group = n_heads // n_kv
        att_out = torch.empty(T, n_heads, hd, dtype=torch.float64)
        for head in range(n_heads):
            kvh = head // group
            scores = q[:, head] @ k[:, kvh].T / math.sqrt(hd)  # (T, T)
            att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            att_out[:, head] = att @ v[:, kvh]
        x = x + att_out.reshape(T, -1) @ w["wo"][layer].T
        h = rmsnorm(x, w["rms_ffn"][layer])
        g = torch.nn.functional.silu(h @ w["w1"][layer].T) * (h @ w["w3"][layer].T)
        x = x + g @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["emb"].T


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_llama2c(CKPT, TOK, tmp_path_factory.mktemp("llama2c") / "stories260K")


@pytest.fixture(scope="module")
def tokenizer(converted: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def model(converted: Path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


@pytest.fixture(scope="module")
def stories() -> list[str]:
    text = SAMPLE.read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]


# --------------------------------------------------------------------------------- tests


def test_folder_layout(converted: Path) -> None:
    names = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    for name in names:
        assert (converted / name).is_file(), name
    assert not list(converted.parent.glob(".*tmp*")), "temporary folder left behind"


def test_readers_known_answers() -> None:
    cfg, arrays = read_llama2c_checkpoint(CKPT)
    assert {k: cfg[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")} == {
        "dim": 64, "hidden_dim": 172, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 512, "seq_len": 512,
    }  # fmt: skip
    assert cfg["shared_classifier"] and cfg["has_freq_cis"]
    assert arrays["wk"].shape == (5, 32, 64) and arrays["w2"].shape == (5, 64, 172)
    assert "wcls" not in arrays
    pieces, scores, max_len = read_llama2c_tokenizer(TOK)
    assert len(pieces) == len(scores) == 512 and max_len == 7
    assert pieces[1] == "\n<s>\n" and pieces[2] == "\n</s>\n" and pieces[3] == "<0x00>" and pieces[258] == "<0xFF>"


def test_tokenizer_matches_llama2c_encoder(tokenizer, stories: list[str]) -> None:
    pieces, scores = _ref_vocab()
    extra = ["", " leading space", "tab\there", "naïve café ☃ 😀", "aaa ... !!! ???", "x"]
    for text in stories + extra:
        want = _ref_encode(text, pieces, scores)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert got == want, f"mismatch on {text[:60]!r}"
        assert tokenizer.decode(got) == text
    assert tokenizer("Once upon a time")["input_ids"][0] == 1
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2 and tokenizer.unk_token_id == 0


def test_logits_match_llama2c_forward(model, tokenizer, stories: list[str]) -> None:
    ids = tokenizer(stories[0])["input_ids"][:128]
    want = _ref_forward(ids).float()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0]
    assert got.shape == want.shape == (len(ids), 512)
    err = (got - want).abs().max().item()
    assert torch.allclose(got, want, atol=1e-4, rtol=0), f"max abs logit error {err:.2e}"


def test_greedy_generation_is_fluent_and_deterministic(model, tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 1
    with torch.no_grad():
        runs = [model.generate(ids, max_new_tokens=40, do_sample=False) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    text = tokenizer.decode(runs[0][0], skip_special_tokens=True)
    assert text.startswith("Once upon a time")
    words = {w.strip(".,!?\"'").lower() for w in text.split()}
    common = {"the", "a", "was", "she", "he", "to", "and", "her", "little", "girl", "boy", "named", "day", "there"}
    assert len(words & common) >= 4, text
    letters = [ch for ch in text if not ch.isspace()]
    assert sum(ch.isalpha() for ch in letters) / len(letters) > 0.85, text
    assert capsys.readouterr().out == ""


def test_nll_on_tinystories(model, tokenizer, stories: list[str]) -> None:
    total, count = 0.0, 0
    with torch.no_grad():
        for story in stories:
            ids = torch.tensor([tokenizer(story)["input_ids"][:512]])
            logits = model(ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    nll = total / count
    assert nll < 1.6, f"per-token NLL {nll:.4f} over {count} tokens (README: about 1.3)"


# --------------------------------------------------------------------------- bad inputs


def _inputs(tmp_path: Path) -> Path:
    """A folder for input files: an output beside them would be in their model folder."""
    folder = tmp_path / "inputs"
    folder.mkdir(exist_ok=True)
    return folder


def test_truncated_checkpoint(tmp_path: Path) -> None:
    bad = _inputs(tmp_path) / "trunc.bin"
    bad.write_bytes(CKPT.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_llama2c_checkpoint(bad)
    with pytest.raises(CheckpointError):
        convert_llama2c(bad, TOK, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_trailing_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "long.bin"
    bad.write_bytes(CKPT.read_bytes() + b"\0" * 12)
    with pytest.raises(CheckpointError, match="implies"):
        read_llama2c_checkpoint(bad)


def test_checkpoint_without_freq_cis_is_accepted(tmp_path: Path) -> None:
    short = tmp_path / "nofreq.bin"
    short.write_bytes(CKPT.read_bytes()[: -2 * 512 * 4 * 4])  # seq_len x head_dim/2, two tables
    cfg, arrays = read_llama2c_checkpoint(short)
    assert not cfg["has_freq_cis"]
    np.testing.assert_array_equal(arrays["rms_final_weight"], read_llama2c_checkpoint(CKPT)[1]["rms_final_weight"])


def test_bad_header(tmp_path: Path) -> None:
    raw = bytearray(CKPT.read_bytes())
    struct.pack_into("<i", raw, 0, 0)  # dim = 0
    bad = tmp_path / "hdr.bin"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="dim=0"):
        read_llama2c_checkpoint(bad)


def test_missing_and_folder_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        convert_llama2c(tmp_path / "nope.bin", TOK, tmp_path / "out")
    with pytest.raises(InputError, match="does not exist"):
        read_llama2c_tokenizer(tmp_path / "nope_tok.bin")
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_llama2c_checkpoint(tmp_path)


def test_truncated_tokenizer(tmp_path: Path) -> None:
    bad = _inputs(tmp_path) / "tok.bin"
    bad.write_bytes(TOK.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        read_llama2c_tokenizer(bad)
    with pytest.raises(CheckpointError):
        convert_llama2c(CKPT, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_vocab_size_mismatch(tmp_path: Path) -> None:
    data = TOK.read_bytes()
    pos = 4
    for _ in range(300):  # cut cleanly after 300 records
        pos += 8 + struct.unpack_from("<i", data, pos + 4)[0]
    bad = _inputs(tmp_path) / "tok300.bin"
    bad.write_bytes(data[:pos])
    assert len(read_llama2c_tokenizer(bad)[0]) == 300
    with pytest.raises(CheckpointError, match="vocab_size=512"):
        convert_llama2c(CKPT, bad, tmp_path / "out")


def test_existing_output_is_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        convert_llama2c(CKPT, TOK, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_force_replaces_output(tmp_path: Path) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "old.txt").write_text("old")
    convert_llama2c(CKPT, TOK, out, force=True)
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()
    shutil.rmtree(out)


def test_untied_classifier(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    raw = bytearray(CKPT.read_bytes())
    struct.pack_into("<i", raw, 20, -512)  # negative vocab_size: the classifier follows the freq_cis tables
    wcls = np.arange(512 * 64, dtype="<f4").reshape(512, 64) / 1e4
    ckpt = _inputs(tmp_path) / "untied.bin"
    ckpt.write_bytes(bytes(raw) + wcls.tobytes())
    cfg, arrays = read_llama2c_checkpoint(ckpt)
    assert not cfg["shared_classifier"] and cfg["vocab_size"] == 512
    np.testing.assert_array_equal(arrays["wcls"], wcls)
    out = convert_llama2c(ckpt, TOK, tmp_path / "untied")
    tensors = load_file(out / "model.safetensors")
    np.testing.assert_array_equal(tensors["lm_head.weight"], wcls)
    assert '"tie_word_embeddings": false' in (out / "config.json").read_text()
