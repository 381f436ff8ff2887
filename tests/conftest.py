"""Shared fixtures: tiny random models of every family, a tiny tokenizer, and ../shared models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

N_LAYERS = 4
VOCAB = 320
SHARED_ENV = "DEPTHPRUNE_SHARED"

_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_DECODER: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# family -> (config class name, kwargs). Sliding windows are small so that chunked
# prefill crosses them.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {**_DECODER}),
    "mistral": ("MistralConfig", {**_DECODER, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", {**_DECODER, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", {**_DECODER, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**_DECODER, "head_dim": 8, "sliding_window": 8}),
    "phi3": ("Phi3Config", {**_DECODER}),
    "phi": ("PhiConfig", {**_DECODER, "num_key_value_heads": 4, "partial_rotary_factor": 0.5}),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=128)),
    "gpt_neox": (
        "GPTNeoXConfig",
        {k: v for k, v in _DECODER.items() if k != "num_key_value_heads"} | {"rotary_pct": 0.5},
    ),
}
FAMILIES = sorted(TINY_CONFIGS)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised causal LM of ``family`` with 4 layers and hidden size 32."""
    import transformers

    cls_name, kwargs = TINY_CONFIGS[family]
    config = getattr(transformers, cls_name)(**{**_COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init leaves norms at their identity values; perturb them so that tests see
    # the norms' effect.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer with ``VOCAB`` entries, trained on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog and the cat sat on the mat"] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family's tiny model saved with a tokenizer, as a user's local folder."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_tokenizer()
    dirs = {}
    for fam in FAMILIES:
        path = root / fam
        tiny_model(fam).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[fam] = path
    return dirs


def shared_dir() -> Path | None:
    """The shared data folder: $DEPTHPRUNE_SHARED, else ../shared beside the repo."""
    env = os.environ.get(SHARED_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip(f"shared data not found: set ${SHARED_ENV} or put it at ../shared beside the repo")
    return path


@pytest.fixture(scope="session")
def stories_dir(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted to a Hugging Face folder (once per session)."""
    from depthprune.llama2c import convert_llama2c

    src = shared / "models" / "stories260K"
    if not (src / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not found in {src}")
    out = tmp_path_factory.mktemp("stories") / "stories260K"
    return convert_llama2c(src / "stories260K.bin", src / "tok512.bin", out)


@pytest.fixture(scope="session")
def stories_lm(stories_dir: Path) -> Any:
    """stories260K loaded once per session (a LoadedModel); tests must leave it unchanged."""
    from depthprune.loading import load_model

    return load_model(str(stories_dir))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf(shared: Path) -> Path:
    """The real SmolLM2-135M-Instruct GGUF file (Llama, 30 layers, Q4_1) from ../shared."""
    path = shared / "models" / "smollm2-135m" / SMOLLM2_GGUF
    if not path.is_file():
        pytest.skip(f"SmolLM2 GGUF not found: expected {path}")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M converted once per session to a plain float32 Hugging Face folder."""
    from depthprune.gguf_import import convert_gguf

    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "smollm2", "float32")


@pytest.fixture(scope="session")
def smollm2_lm(smollm2_dir: Path) -> Any:
    """The converted SmolLM2 loaded once per session (a LoadedModel); tests must leave it unchanged."""
    from depthprune.loading import load_model

    return load_model(str(smollm2_dir))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    # The models under test are tiny: on two shared cores one torch thread per test
    # process is faster and steadier than two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sharded_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (4 layers, seed 3) saved in several safetensors shards, with a tokenizer.

    Shared by the streamed-execution tests; nothing may write into it (the CLI refuses
    outputs inside a model folder anyway).
    """
    path = tmp_path_factory.mktemp("sharded") / "llama"
    tiny_model("llama", seed=3).save_pretrained(path, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(path)
    return path


def spy_layer_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the names of the decoder-layer tensors that streamed execution reads, in order."""
    from depthprune.streamed.checkpoint import LazyCheckpoint

    loads: list[str] = []
    real = LazyCheckpoint.load_

    def spy(self: LazyCheckpoint, names: Any) -> None:
        names = list(names)
        loads.extend(n for n in names if ".layers." in n)
        real(self, names)

    monkeypatch.setattr(LazyCheckpoint, "load_", spy)
    return loads


def one_line_error(code: int, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Assert a CLI bad-input exit: code 2 and one stderr line holding ``needles``, no traceback.

    Returns:
        That line.
    """
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("depthprune: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


STREAM_TEXT = "the quick brown fox jumps over the lazy dog and the cat sat on the mat. " * 40


@pytest.fixture(scope="module")
def stream_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibration text for the streamed-execution tests."""
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(STREAM_TEXT)
    return path


def random_tokens(n: int = 5, t: int = 24, vocab: int = 320, seed: int = 1) -> Any:
    """``n`` packed sequences of ``t`` random token ids (3 and up: past the special tokens)."""
    from depthprune.data import pack

    g = torch.Generator().manual_seed(seed)
    return pack(torch.randint(3, vocab, (n * t,), generator=g).tolist(), n, t)
