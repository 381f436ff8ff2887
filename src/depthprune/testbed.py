"""A self-made model for offline demos and benchmarks.

``build_testbed`` writes a small Llama-architecture model trained from scratch on a
corpus that this module generates itself: short stories from templates, in which
characters are introduced by name and referred to again later, so that attention has to
carry information across the text and the layers differ in importance. Everything is
seeded, needs no network and no files beyond the package, and takes a couple of minutes
on two CPU cores for the default size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from depthprune._fs import atomic_dir, check_output, os_errors
from depthprune.errors import InputError
from depthprune.progress import counter

logger = logging.getLogger(__name__)

_LAYOUT_VERSION = 2  # bump when the files written next to the model change
_NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Sam", "Lucy", "Tim", "Zoe", "Jack"]
_ANIMALS = ["cat", "dog", "bird", "fox", "bear", "frog", "duck", "rabbit", "mouse", "fish"]
_ADJS = ["little", "big", "happy", "shy", "brave", "kind", "funny", "small", "sleepy", "clever"]
_PLACES = ["park", "garden", "forest", "house", "river", "school", "beach", "hill", "farm", "town"]
_THINGS = ["ball", "box", "hat", "kite", "cake", "book", "toy", "flower", "stone", "boat"]
_COLORS = ["red", "blue", "green", "yellow", "pink", "white", "black", "orange", "purple", "brown"]
_VERBS = ["play", "run", "sing", "read", "jump", "swim", "dance", "draw", "hide", "walk"]
_FEELINGS = ["happy", "sad", "surprised", "scared", "proud", "excited", "tired", "angry"]


def _story(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    animal, adj, place, place2 = rng.choice(_ANIMALS), rng.choice(_ADJS), *rng.sample(_PLACES, 2)
    thing, color, verb, feeling = rng.choice(_THINGS), rng.choice(_COLORS), rng.choice(_VERBS), rng.choice(_FEELINGS)
    count = rng.randint(2, 5)
    sentences = [
        f"Once upon a time, there was a {adj} {animal} named {a}.",
        f"{a} liked to {verb} in the {place}.",
        rng.choice(
            [
                f"One day, {a} found a {color} {thing} near the {place}.",
                f"One day, {a} met a friend named {b} in the {place}.",
                f"One day, {a} saw {count} {color} {thing}s in the {place2}.",
            ]
        ),
    ]
    if "friend" in sentences[-1]:
        sentences += [f"{b} wanted to {verb} too.", f"{a} and {b} went to the {place2} together."]
    elif "saw" in sentences[-1]:
        sentences += [f"{a} took one {thing} home.", f"Now there were {count - 1} {thing}s left in the {place2}."]
    else:
        sentences += [f"{a} showed the {color} {thing} to {b}.", f"{b} said, \"What a nice {thing}!\""]
    sentences += [f"{a} felt {feeling}.", f"At the end of the day, {a} went back to the {place} and slept."]
    return " ".join(sentences)


def generate_corpus(n_stories: int, seed: int = 0) -> list[str]:
    """``n_stories`` template stories, the same for the same seed."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n_stories)]


@dataclass(frozen=True)
class TestbedConfig:
    """Size and training budget of the testbed model.

    Attributes:
        layers: Decoder layers (at least 2).
        hidden: Hidden size (a multiple of ``heads``).
        heads: Attention heads; key/value heads are half of them.
        vocab: Byte-level BPE vocabulary size.
        seq_len: Training sequence length.
        steps: Optimizer steps.
        batch: Sequences per step.
        lr: Peak learning rate (cosine decay after 5% warm-up).
        n_stories: Stories in the generated corpus.
        seed: Seeds the corpus, the initialisation and the batches.
    """

    __test__ = False  # not a pytest class

    layers: int = 8
    hidden: int = 64
    heads: int = 4
    vocab: int = 512
    seq_len: int = 128
    steps: int = 400
    batch: int = 16
    lr: float = 3e-3
    n_stories: int = 4000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layers < 2:
            raise InputError(f"the testbed needs at least 2 layers, got {self.layers}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise InputError(f"hidden size {self.hidden} must split into {self.heads} heads of even size")
        if self.steps < 1 or self.batch < 1 or self.seq_len < 16:
            raise InputError(f"need steps >= 1, batch >= 1 and seq_len >= 16; got {self.steps}, {self.batch}, {self.seq_len}")

    def digest(self) -> str:
        """A short hash naming this configuration (and the folder layout) in the cache."""
        key = {**asdict(self), "layout": _LAYOUT_VERSION}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _tokenizer(texts: list[str], vocab: int) -> Any:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _model(config: TestbedConfig, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=config.hidden,
        intermediate_size=config.hidden * 8 // 3,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=max(1, config.heads // 2),
        max_position_embeddings=max(256, config.seq_len),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def train_testbed(config: TestbedConfig, show_progress: bool = True) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Generate the corpus, train the tokenizer and the model; return both and a summary."""
    from depthprune.data import pack, token_stream

    texts = generate_corpus(config.n_stories, config.seed)
    tokenizer = _tokenizer(texts, config.vocab)
    stream = token_stream(texts, tokenizer)
    n_windows = len(stream) // config.seq_len
    data = pack(stream, n_windows, config.seq_len, seed=config.seed).input_ids  # (N, T)
    held_out = data[-max(1, n_windows // 20) :]
    train = data[: len(data) - len(held_out)]
    torch.manual_seed(config.seed)
    model = _model(config, len(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps)))
    )
    g = torch.Generator().manual_seed(config.seed)
    model.train()
    with counter(config.steps, desc="training testbed", disable=not show_progress) as bar:
        for _ in range(config.steps):
            batch = train[torch.randint(0, len(train), (config.batch,), generator=g)]
            loss = model(batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        eval_loss = float(model(held_out, labels=held_out).loss)
    summary = {
        "config": asdict(config),
        "train_tokens": int(train.numel()),
        "final_train_loss": float(loss.item()),
        "held_out_loss": eval_loss,
        "params": sum(p.numel() for p in model.parameters()),
    }
    logger.info("testbed trained: held-out loss %.3f", eval_loss)
    return model, tokenizer, summary


def default_cache_dir() -> Path:
    """``$DEPTHPRUNE_CACHE``, else ``$XDG_CACHE_HOME/depthprune``, else ``~/.cache/depthprune``."""
    env = os.environ.get("DEPTHPRUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "depthprune"


def testbed_dir(config: TestbedConfig) -> Path:
    """The cache folder of the testbed model of ``config``."""
    return default_cache_dir() / "testbed" / config.digest()


def build_testbed(
    config: TestbedConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> Path:
    """Train (or reuse from the cache) the testbed model and return its folder.

    Args:
        config: Size and budget; the default is the demo model (8 layers).
        out: Where to write it; by default a cache folder named by the config's hash,
            which is reused when present.
        force: Retrain even when the cached folder exists, or replace ``out``.
        show_progress: Show the training progress bar on a terminal.
    """
    config = config or TestbedConfig()
    target = Path(out) if out is not None else testbed_dir(config)
    if out is None and (target / "testbed.json").is_file() and not force:
        logger.info("using cached testbed %s", target)
        return target
    if out is None:
        with os_errors(target.parent):
            target.parent.mkdir(parents=True, exist_ok=True)
    else:
        check_output(target, force, "dir")  # before training
    model, tokenizer, summary = train_testbed(config, show_progress)
    with atomic_dir(target, force=force or out is None) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "testbed.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        # Fresh stories (other seeds) for calibration and for evaluation.
        for name, offset in (("calibration.txt", 1), ("eval.txt", 2)):
            text = "\n<|endoftext|>\n".join(generate_corpus(min(config.n_stories, 400), config.seed + offset))
            (tmp / name).write_text(text, encoding="utf-8")
    return target
