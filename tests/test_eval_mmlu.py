"""MMLU: the paper's prompt byte for byte, letter tokens, CSV layouts, prefix-cache reuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILIES, tiny_model, tiny_tokenizer

from depthprune.errors import InputError
from depthprune.evaluate.mmlu import (
    MMLUConfig,
    MMLUQuestion,
    answer_continuations,
    answer_token_ids,
    build_prompt,
    evaluate_mmlu,
    fit_prompt,
    format_question,
    format_subject,
    letter_logprobs,
    load_mmlu,
    prepare_mmlu,
)
from depthprune.units import mask_units


def _trained_tokenizer(kind: str, texts: list[str], vocab: int = 320) -> Any:
    """A BPE tokenizer trained on ``texts``: byte-level (GPT-2, "ĠA") or metaspace (SentencePiece, "▁A")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if kind == "byte_level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


ANSWER_TEXTS = [f"Answer: {letter}" for letter in "ABCD"] * 50


# --------------------------------------------------------------------------- prompt


def test_prompt_is_byte_exact_for_a_real_question(shared: Path) -> None:
    mmlu = shared / "data" / "mmlu"
    shots = load_mmlu(mmlu, "dev", ["abstract_algebra"])["abstract_algebra"]
    question = load_mmlu(mmlu, "test", ["abstract_algebra"], limit=1)["abstract_algebra"][0]
    expected = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are "
        "subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\n"
        "Answer: B\n\n"
        "Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The symmetric "
        "group S_10 has 10 elements.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: C\n\n"
        "Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every subgroup "
        "of an abelian group is abelian.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: A\n\n"
        "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    assert build_prompt("abstract_algebra", shots, question) == expected
    assert question.answer == 1


def test_format_helpers() -> None:
    assert format_subject("high_school_us_history") == "high school us history"
    q = MMLUQuestion("x", " Q? ", ("a", "b", "c", "d"), 3)
    assert format_question(q, with_answer=False) == " Q? \nA. a\nB. b\nC. c\nD. d\nAnswer:"  # not stripped
    assert format_question(q, with_answer=True) == " Q? \nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n"


def test_fit_prompt_drops_shots_from_the_end() -> None:
    tok = tiny_tokenizer()
    shots = [MMLUQuestion("s", f"the quick brown fox {i}", ("a", "b", "c", "d"), i % 4) for i in range(5)]
    q = MMLUQuestion("s", "the lazy dog", ("a", "b", "c", "d"), 0)
    full = len(tok(build_prompt("s", shots, q))["input_ids"])
    assert fit_prompt("s", shots, q, tok, full) == (build_prompt("s", shots, q), 5)
    prompt, k = fit_prompt("s", shots, q, tok, full - 1)
    assert k == 4 and prompt == build_prompt("s", shots[:4], q)
    assert fit_prompt("s", shots, q, tok, 3)[1] == 0  # nothing fits: no shots, truncated later


# --------------------------------------------------------------------------- letter tokens


def test_answer_tokens_llama2c_byte_fallback(stories_lm: Any) -> None:
    tok = stories_lm.tokenizer
    conts = answer_continuations(tok)
    # tok512 has a " B" piece but no " A", " C", " D": those are " " then the letter.
    assert [tok.convert_ids_to_tokens(list(c)) for c in conts] == [[" ", "A"], [" B"], [" ", "C"], [" ", "D"]]
    with pytest.raises(InputError, match="not one token"):
        answer_token_ids(tok)


@pytest.mark.parametrize(("kind", "pieces"), [("byte_level", ["ĠA", "ĠB", "ĠC", "ĠD"]), ("metaspace", ["▁A", "▁B", "▁C", "▁D"])])
def test_answer_tokens_single_piece(kind: str, pieces: list[str]) -> None:
    tok = _trained_tokenizer(kind, ANSWER_TEXTS, vocab=300)
    ids = answer_token_ids(tok)
    assert tok.convert_ids_to_tokens(ids) == pieces
    # The id is what follows "Answer:" inside a real prompt as well.
    prompt_ids = tok("Find it.\nA. x\nB. y\nC. z\nD. w\nAnswer: C\n\n")["input_ids"]
    assert ids[2] in prompt_ids


def test_answer_tokens_gpt2_style_without_letter_merges() -> None:
    tok = tiny_tokenizer()  # trained on lower-case text: no "ĠA" piece
    conts = answer_continuations(tok)
    assert [tok.convert_ids_to_tokens(list(c)) for c in conts] == [["Ġ", L] for L in "ABCD"]


# --------------------------------------------------------------------------- data


def _write_layout(root: Path, header: bool, letters: bool) -> None:
    rows = {
        "dev": [("What is 1+1?", "1", "2", "3", "4", 1), ('Say "hi", twice', "hi", "hi hi", "none", "None", 1)],
        "test": [("Pick C", "a", "b", "c", "d", 2), ("Pick A\nreally", "a", "b, or not", "c", "d", 0)],
    }
    import csv

    for split, data in rows.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        with (root / split / f"toy_subject_{split}.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            if header:
                w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            for *text, answer in data:
                w.writerow([*text, "ABCD"[answer] if letters else answer])


def test_header_and_original_layouts_load_the_same(tmp_path: Path) -> None:
    _write_layout(tmp_path / "ours", header=True, letters=False)
    _write_layout(tmp_path / "orig" / "data", header=False, letters=True)  # the original release
    for split in ("dev", "test"):
        a = load_mmlu(tmp_path / "ours", split)
        b = load_mmlu(tmp_path / "orig", split)
        assert a == b
    test = load_mmlu(tmp_path / "ours", "test")["toy_subject"]
    assert [q.answer for q in test] == [2, 0]
    assert test[1] == MMLUQuestion("toy_subject", "Pick A\nreally", ("a", "b, or not", "c", "d"), 0)
    assert load_mmlu(tmp_path / "ours", "dev")["toy_subject"][1].choices[3] == "None"  # a string, not NaN
    assert len(load_mmlu(tmp_path / "ours", "test", limit=1)["toy_subject"]) == 1


def test_bad_mmlu_sources(tmp_path: Path, shared: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_mmlu(tmp_path / "missing")
    with pytest.raises(InputError, match="Did you mean: anatomy"):
        load_mmlu(shared / "data" / "mmlu", "test", ["anatomyy"])
    with pytest.raises(InputError, match="no test/ folder"):
        load_mmlu(tmp_path)
    _write_layout(tmp_path / "bad", header=True, letters=False)
    path = tmp_path / "bad" / "test" / "toy_subject_test.csv"
    path.write_text(path.read_text() + "only,three,columns\n")  # line 5: a question spans 2 lines
    with pytest.raises(InputError, match=r"toy_subject_test.csv:5 has 3 columns"):
        load_mmlu(tmp_path / "bad")
    path.write_text("q,a,b,c,d,E\n")
    with pytest.raises(InputError, match="answer 'E' is not a letter"):
        load_mmlu(tmp_path / "bad")


# --------------------------------------------------------------------------- evaluation


def test_cached_prefix_equals_full_prompt_on_stories_with_attn_masked(stories_lm: Any, shared: Path) -> None:
    mmlu = shared / "data" / "mmlu"
    config = MMLUConfig(limit=4, subjects=("abstract_algebra", "world_religions"), show_progress=False)
    model, tok = stories_lm.model, stories_lm.tokenizer
    test = load_mmlu(mmlu, "test", list(config.subjects), config.limit)
    dev = load_mmlu(mmlu, "dev", list(config.subjects))
    cached = prepare_mmlu(tok, test, dev, config, max_length=512)
    plain = prepare_mmlu(tok, test, dev, MMLUConfig(reuse_prefix=False), max_length=512)
    assert cached.stats["n_cached"] == 8 and plain.stats["n_cached"] == 0
    with mask_units(model, ["attn.1"]):
        a = letter_logprobs(model, cached, batch_size=3, show_progress=False)
        b = letter_logprobs(model, plain, batch_size=3, show_progress=False)
        result = evaluate_mmlu(model, tok, mmlu, config)
    full = letter_logprobs(model, plain, batch_size=8, show_progress=False)
    assert torch.allclose(a, b, atol=1e-4, rtol=0)
    assert a.argmax(-1).tolist() == b.argmax(-1).tolist() == result["predictions"]
    assert not torch.allclose(a, full, atol=1e-3)  # the mask was really on
    # Invariants of the result.
    answers = [q.answer for s in sorted(test) for q in test[s]]
    assert result["answers"] == answers and result["n"] == 8
    assert result["micro_accuracy"] == sum(p == y for p, y in zip(result["predictions"], answers)) / 8
    per = result["subjects"]
    assert result["macro_accuracy"] == pytest.approx(sum(s["accuracy"] for s in per.values()) / 2)
    assert result["protocol"]["scoring"] == "continuation_logprob"
    assert sum(int(v) for v in result["protocol"]["n_shots_used"].values()) == 8


def _synthetic_mmlu(root: Path) -> None:
    import csv

    words = ["cat", "dog", "sun", "red", "map", "cup", "box", "pen"]
    for subject in ("alpha_things", "beta_things"):
        for split, n in (("dev", 5), ("test", 7)):
            (root / split).mkdir(parents=True, exist_ok=True)
            with (root / split / f"{subject}_{split}.csv").open("w", newline="") as fh:
                w = csv.writer(fh)
                for i in range(n):
                    choices = [words[(i + j) % 8] for j in range(4)]
                    w.writerow([f"Which is {words[i % 8]}?", *choices, i % 4])


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefix_equals_full_prompt_on_every_family(family: str, tmp_path: Path) -> None:
    _synthetic_mmlu(tmp_path)
    test, dev = load_mmlu(tmp_path, "test"), load_mmlu(tmp_path, "dev")
    # Texts that end in "\n\n" teach it a "ĊĊ" piece, as GPT-2 has.
    texts = [build_prompt(s, dev[s], q) for s in test for q in test[s]] + ANSWER_TEXTS + ["end.\n\n"] * 50
    tok = _trained_tokenizer("byte_level", texts, vocab=320)
    assert "ĊĊ" in tok.get_vocab()
    model = tiny_model(family)
    cached = prepare_mmlu(tok, test, dev, MMLUConfig(), max_length=128)
    plain = prepare_mmlu(tok, test, dev, MMLUConfig(reuse_prefix=False), max_length=128)
    assert cached.stats["n_cached"] == 14
    assert set(cached.n_shots) == {2}  # 5 shots do not fit in 128 tokens
    # Byte-level BPE reads the prefix's final "\n\n" as one piece, but as two when a
    # question follows; the cached prefix ends one token earlier, and is still used.
    q = test["alpha_things"][0]
    alone = tok(build_prompt("alpha_things", dev["alpha_things"][:2], q).removesuffix(format_question(q, False)))["input_ids"]
    assert tok.convert_ids_to_tokens(alone[-1]) == "ĊĊ"
    assert cached.groups[0].prefix == tuple(alone[:-1])
    with mask_units(model, ["attn.1"]):
        a = letter_logprobs(model, cached, batch_size=4, show_progress=False)
        b = letter_logprobs(model, plain, batch_size=4, show_progress=False)
    assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_long_prompts_are_truncated_from_the_left(tmp_path: Path) -> None:
    _synthetic_mmlu(tmp_path)
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    result = evaluate_mmlu(model, tok, tmp_path, MMLUConfig(max_length=16, limit=2, show_progress=False))
    assert result["protocol"]["n_truncated"] == 4
    assert result["protocol"]["n_shots_used"] == {"0": 4}
    assert len(result["predictions"]) == 4


# --------------------------------------------------------------------------- against a direct computation


@torch.no_grad()
def _direct_letter_logprobs(model: torch.nn.Module, tok: Any, prompt: str) -> list[float]:
    """log P(" X" | prompt) for X in A-D: ``model(prompt + " X")`` in one plain pass, the
    letter's tokens being what the whole text holds after the prompt's tokens."""
    ids = tok(prompt)["input_ids"]
    out = []
    for letter in "ABCD":
        whole = tok(prompt + " " + letter)["input_ids"]
        assert whole[: len(ids)] == ids
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        out.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ids), len(whole))))
    return out


def _check_against_direct(model: torch.nn.Module, tok: Any, test: dict, dev: dict, max_length: int) -> None:
    """letter_logprobs (prefix cache, batched) equals the direct computation for every question.

    Tolerance: both are float32 forward passes, one over a cached prefix copied into
    right-padded batches and one over the whole prompt; the letters' log-probabilities
    (-0.5 to -10) agree to a few 1e-6 (measured 6e-6 on stories260K). 1e-4 absolute is well below the gap a wrong position
    or token would make (whole nats).
    """
    prepared = prepare_mmlu(tok, test, dev, MMLUConfig(), max_length=max_length)
    assert prepared.stats["n_cached"] == len(prepared.questions)  # every question used the cache
    ours = letter_logprobs(model, prepared, batch_size=3, show_progress=False)
    for i, q in enumerate(prepared.questions):
        prompt = build_prompt(q.subject, dev[q.subject][: prepared.n_shots[i]], q)
        want = _direct_letter_logprobs(model, tok, prompt)
        assert torch.allclose(ours[i].double(), torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=0), (i, ours[i], want)


def test_letter_logprobs_equal_a_direct_computation_on_stories(stories_lm: Any, shared: Path) -> None:
    # tok512 spells " A" as " " + "A" but has a " B" piece: multi- and single-token letters.
    mmlu = shared / "data" / "mmlu"
    subjects = ["astronomy", "virology"]
    test, dev = load_mmlu(mmlu, "test", subjects, limit=3), load_mmlu(mmlu, "dev", subjects)
    _check_against_direct(stories_lm.model, stories_lm.tokenizer, test, dev, max_length=512)


def test_letter_logprobs_equal_a_direct_computation_with_one_token_letters(tmp_path: Path) -> None:
    _synthetic_mmlu(tmp_path)
    test, dev = load_mmlu(tmp_path, "test", limit=3), load_mmlu(tmp_path, "dev")
    texts = [build_prompt(s, dev[s], q) for s in test for q in test[s]] + ANSWER_TEXTS
    tok = _trained_tokenizer("metaspace", texts, vocab=320)
    assert len(answer_token_ids(tok)) == 4  # "▁A".."▁D"
    model = tiny_model("qwen2")
    with mask_units(model, ["mlp.2"]):
        _check_against_direct(model, tok, test, dev, max_length=128)
