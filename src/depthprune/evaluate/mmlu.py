"""MMLU in the 5-shot protocol of Hendrycks et al., as used by the depth-pruning paper.

Prompt, byte for byte (``build_prompt``)::

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {question}\\nA. {choice}\\nB. {choice}\\nC. {choice}\\nD. {choice}\\nAnswer: {letter}\\n\\n   (x 5 shots)
    {question}\\nA. {choice}\\nB. {choice}\\nC. {choice}\\nD. {choice}\\nAnswer:

with the subject's underscores turned into spaces and the shots being the first five
questions of the subject's dev split. When a prompt does not fit the model's context,
shots are dropped from the end until it does (a prompt that does not fit even with no
shot keeps its last tokens). The prompt is tokenized as the tokenizer does by default
(with BOS when it adds one).

The prediction is the answer letter with the highest score at the position after
"Answer:". A letter's tokens are what the tokenizer produces for " A" after "Answer:"
(``▁A`` for SentencePiece, ``ĠA`` for GPT-2). When each letter is one token, its score
is its logit there, which is the paper's rule. Some byte-fallback vocabularies have no
piece for " A" and spell it as two tokens (" " then "A"); then a letter's score is the
summed log-probability of its tokens, which is what lm-evaluation-harness computes,
and the protocol records ``scoring: "continuation_logprob"``.

Speed: every question of a subject shares the same few-shot prefix. Its KV cache is
computed once per subject and copied into each batch of questions, which only run
their own tokens. The cached prefix ends at a token boundary that the full prompt's
tokenization shares; a question whose tokenization does not share it runs in full.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.data import context_length, tokenizer_adds_bos
from depthprune.errors import InputError, check_choice, first_line
from depthprune.evaluate._model import (
    accepts_logits_to_keep,
    logits_at,
    model_device,
    output_cache,
    pad_id_of,
    right_pad,
)
from depthprune.progress import counter

logger = logging.getLogger(__name__)

__all__ = [
    "CHOICES",
    "MMLUConfig",
    "MMLUQuestion",
    "MMLU_SUBJECTS",
    "PreparedMMLU",
    "PromptGroup",
    "answer_continuations",
    "answer_token_ids",
    "build_prompt",
    "evaluate_mmlu",
    "fit_prompt",
    "format_question",
    "format_subject",
    "letter_logprobs",
    "load_mmlu",
    "prepare_mmlu",
]

CHOICES: tuple[str, str, str, str] = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"
REFERENCE = "Hendrycks et al. 2021, Measuring Massive Multitask Language Understanding (5-shot prompt of their evaluate.py)"
HF_DATASET = "cais/mmlu"
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)  # fmt: skip
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A cached prefix may end this many tokens before the end of the prefix's own
# tokenization (byte-level BPE merges "\n\n" differently when text follows it).
_BOUNDARY_SLACK = 4


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU question; ``answer`` is the index (0-3) of the right choice."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int


def _parse_answer(value: str, where: str) -> int:
    text = value.strip()
    if text.upper() in CHOICES:
        return CHOICES.index(text.upper())
    if text in ("0", "1", "2", "3"):
        return int(text)
    raise InputError(f"{where}: answer {value!r} is not a letter A-D or an index 0-3; fix the file")


def _read_csv(path: Path, subject: str, limit: int | None) -> list[MMLUQuestion]:
    """Read ``question,choice0..3,answer`` rows, with or without a header row."""
    questions: list[MMLUQuestion] = []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            for row in reader:
                if not row:
                    continue
                if not questions and reader.line_num == 1 and row[-1].strip().lower() == "answer":
                    continue  # header row
                where = f"{path}:{reader.line_num}"
                if len(row) != 6:
                    raise InputError(f"{where} has {len(row)} columns; expected 6 (question, 4 choices, answer)")
                choices = (row[1], row[2], row[3], row[4])
                questions.append(MMLUQuestion(subject, row[0], choices, _parse_answer(row[5], where)))
                if limit is not None and len(questions) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text; expected an MMLU CSV file") from exc
    except csv.Error as exc:
        raise InputError(f"{path} is not a valid CSV file ({exc}); expected MMLU rows") from exc
    return questions


def _check_subjects(subjects: Iterable[str], available: list[str], where: str) -> list[str]:
    chosen = list(dict.fromkeys(subjects))
    for s in chosen:
        check_choice(s, available, "MMLU subject", f" in {where}")
    return chosen


def _local_root(path: Path, split: str) -> Path:
    if (path / split).is_dir():
        return path
    if (path / "data" / split).is_dir():  # the original release unpacks to data/
        return path / "data"
    raise InputError(
        f"MMLU folder {str(path)!r} has no {split}/ folder; expected {split}/<subject>_{split}.csv files "
        "as in the original release"
    )


def _load_local(path: Path, split: str, subjects: list[str] | None, limit: int | None) -> dict[str, list[MMLUQuestion]]:
    folder = _local_root(path, split) / split
    suffix = f"_{split}.csv"
    available = sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}") if p.is_file())
    if not available:
        raise InputError(f"MMLU folder {str(folder)!r} has no <subject>{suffix} files")
    chosen = _check_subjects(subjects, available, str(folder)) if subjects else available
    return {s: _read_csv(folder / f"{s}{suffix}", s, limit) for s in sorted(chosen)}


def _load_hf(name: str, split: str, subjects: list[str] | None, limit: int | None) -> dict[str, list[MMLUQuestion]]:
    try:
        import datasets
    except ImportError as exc:
        raise InputError(f"{name!r} is not a local folder, and reading it from the Hub needs `pip install datasets`") from exc
    chosen = _check_subjects(subjects, list(MMLU_SUBJECTS), name) if subjects else list(MMLU_SUBJECTS)
    out: dict[str, list[MMLUQuestion]] = {}
    for s in sorted(chosen):
        try:
            ds = datasets.load_dataset(name, s, split=split)
        except Exception as exc:  # datasets raises many unrelated types for "not reachable"
            first = first_line(exc)
            raise InputError(
                f"cannot load MMLU subject {s!r} ({split}) from {name!r}: {first}; give a local folder with "
                f"{split}/<subject>_{split}.csv files instead"
            ) from exc
        rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
        out[s] = [MMLUQuestion(s, r["question"], tuple(r["choices"]), int(r["answer"])) for r in rows]  # type: ignore[arg-type]
    return out


def load_mmlu(
    source: str | Path, split: str = "test", subjects: list[str] | None = None, limit: int | None = None
) -> dict[str, list[MMLUQuestion]]:
    """Load MMLU questions per subject, in file order, subjects sorted by name.

    Args:
        source: A local folder with ``{split}/<subject>_{split}.csv`` files (or the
            original release's ``data/`` folder above them), or a Hub dataset id such as
            ``cais/mmlu`` (needs ``datasets`` and a reachable hub). A CSV may start with
            a header row; answers are letters A-D or indices 0-3.
        split: ``test``, ``dev`` or ``val``.
        subjects: Subjects to load; all of them when ``None``.
        limit: Keep only the first ``limit`` questions of each subject.

    Raises:
        InputError: a missing folder or file, a malformed row, an unknown subject.
    """
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")
    path = Path(source).expanduser()
    if path.is_dir():
        data = _load_local(path, split, subjects, limit)
    elif path.exists():
        raise InputError(f"MMLU source {str(source)!r} is a file; expected a folder with {split}/<subject>_{split}.csv files")
    elif _HUB_ID.match(str(source)) and not str(source).startswith("."):
        data = _load_hf(str(source), split, subjects, limit)
    else:
        raise InputError(f"MMLU folder {str(source)!r} does not exist; give a folder of CSV files or {HF_DATASET}")
    empty = [s for s, qs in data.items() if not qs]
    if empty:
        raise InputError(f"MMLU subject(s) {', '.join(empty)} have no {split} questions in {str(source)!r}")
    return data


# --------------------------------------------------------------------------- prompts


def format_subject(subject: str) -> str:
    """``high_school_physics`` -> ``high school physics``."""
    return " ".join(subject.split("_"))


def format_question(q: MMLUQuestion, with_answer: bool) -> str:
    """``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` plus `` X\\n\\n`` when ``with_answer``."""
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(CHOICES, q.choices)) + "\nAnswer:"
    return (text + f" {CHOICES[q.answer]}\n\n") if with_answer else text


def _prefix(subject: str, shots: Iterable[MMLUQuestion]) -> str:
    return HEADER.format(format_subject(subject)) + "".join(format_question(s, True) for s in shots)


def build_prompt(subject: str, shots: list[MMLUQuestion], question: MMLUQuestion) -> str:
    """The full prompt: header, the answered shots, then ``question`` ending in ``Answer:``."""
    return _prefix(subject, shots) + format_question(question, False)


def _encode(tokenizer: Any, texts: list[str], bos: bool) -> list[list[int]]:
    """Token ids as the tokenizer gives them by default, BOS included, never an EOS."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    head = [tokenizer.bos_token_id] if bos else []
    return [head + list(x) for x in ids]


def fit_prompt(
    subject: str, shots: list[MMLUQuestion], question: MMLUQuestion, tokenizer: Any, max_tokens: int
) -> tuple[str, int]:
    """The prompt with as many of ``shots`` (from the first) as fit in ``max_tokens``.

    Tokens are counted as the model sees them (with BOS when the tokenizer adds one).

    Returns:
        ``(prompt, n_shots_used)``. When even the prompt without shots is too long, it is
        returned with 0 shots; the evaluation then keeps its last ``max_tokens`` tokens.
    """
    bos = tokenizer_adds_bos(tokenizer)
    for k in range(len(shots), -1, -1):
        prompt = build_prompt(subject, shots[:k], question)
        if k == 0 or len(_encode(tokenizer, [prompt], bos)[0]) <= max_tokens:
            return prompt, k
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- answer tokens


def answer_continuations(tokenizer: Any) -> list[tuple[int, ...]]:
    """The tokens that each of A, B, C, D adds after ``Answer:``.

    Found by tokenizing ``"Answer: X"`` and ``"Answer:"`` and keeping the difference, so
    the space is handled as the tokenizer handles it (``▁A``, ``ĠA``, or ``" "`` + ``A``).

    Raises:
        InputError: the tokenizer merges the letter into ``Answer:``, two letters give the
            same tokens, or the multi-token letters do not share their leading tokens.
    """
    base = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    conts: list[tuple[int, ...]] = []
    for letter in CHOICES:
        full = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) == len(base):
            raise InputError(
                f"the tokenizer merges the answer letter {letter} into 'Answer:' ({full} vs {base}); "
                "the MMLU letter tokens cannot be found for it"
            )
        conts.append(tuple(full[len(base) :]))
    if len(set(conts)) != len(conts):
        raise InputError(f"answer letters A-D tokenize to repeated token ids {conts}; the tokenizer cannot tell them apart")
    longest = max((c[:-1] for c in conts), key=len)
    if any(c[:-1] != longest[: len(c) - 1] for c in conts):
        raise InputError(
            f"answer letters tokenize to multi-token continuations {conts} that do not share their leading tokens; "
            "this tokenizer is not supported by the MMLU evaluation"
        )
    return conts


def answer_token_ids(tokenizer: Any) -> list[int]:
    """The ids of A, B, C, D as the model produces them right after ``Answer:``.

    Raises:
        InputError: a letter is not exactly one token there (e.g. byte-fallback
            vocabularies without a " A" piece); :func:`answer_continuations` gives the
            tokens in that case, and :func:`evaluate_mmlu` scores their log-probability.
    """
    conts = answer_continuations(tokenizer)
    if any(len(c) != 1 for c in conts):
        pieces = {
            letter: tokenizer.convert_ids_to_tokens(list(c)) for letter, c in zip(CHOICES, conts) if len(c) != 1
        }
        raise InputError(
            f"answer letters {', '.join(pieces)} are not one token after 'Answer:' ({pieces}); "
            "use answer_continuations() and score their summed log-probability, as evaluate_mmlu does"
        )
    return [c[0] for c in conts]


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class MMLUConfig:
    """How MMLU is run.

    Attributes:
        shots: Few-shot examples per prompt, from the start of the dev split.
        limit: Questions per subject (the first ones); all when ``None``.
        subjects: Subjects to run; all when ``None``.
        split: Split holding the questions to answer.
        shots_split: Split the shots come from.
        max_length: Token budget of a prompt; default: the model's context.
        batch_size: Questions per forward pass.
        reuse_prefix: Compute each subject's few-shot prefix once and reuse its KV cache.
        show_progress: Show a progress bar on a terminal.
    """

    shots: int = 5
    limit: int | None = None
    subjects: tuple[str, ...] | None = None
    split: str = "test"
    shots_split: str = "dev"
    max_length: int | None = None
    batch_size: int = 8
    reuse_prefix: bool = True
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise InputError(f"shots must be 0 or more, got {self.shots}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 8:
            raise InputError(f"max_length must be at least 8 tokens, got {self.max_length}")
        if self.subjects is not None and not self.subjects:
            raise InputError("subjects is empty; leave it out to run all subjects")


@dataclass(frozen=True)
class PromptGroup:
    """Questions that share a cached prefix (none when ``prefix`` is empty).

    Attributes:
        prefix: Token ids whose KV cache is computed once.
        items: ``(question index, token ids after the prefix)`` per question.
    """

    prefix: tuple[int, ...]
    items: tuple[tuple[int, tuple[int, ...]], ...]


@dataclass(frozen=True)
class PreparedMMLU:
    """Tokenized MMLU prompts, ready to be scored any number of times (e.g. under masks).

    Attributes:
        questions: Every question, subjects sorted by name, questions in file order.
        groups: The prompts, grouped by shared prefix.
        continuations: Tokens of each answer letter after ``Answer:``.
        n_shots: Shots used in each question's prompt.
        truncated: Whether each prompt lost its start to fit ``max_length``.
        max_length: The token budget of a prompt (with the letter tokens fed after it).
        bos: Whether prompts start with BOS.
        pad_id: Token that right-pads rows (masked out).
        stats: Questions run on a cached prefix or in full, and token counts.
    """

    questions: tuple[MMLUQuestion, ...]
    groups: tuple[PromptGroup, ...]
    continuations: tuple[tuple[int, ...], ...]
    n_shots: tuple[int, ...]
    truncated: tuple[bool, ...]
    max_length: int
    bos: bool
    pad_id: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def extension(self) -> tuple[int, ...]:
        """Tokens fed after the prompt so that multi-token letters can be scored."""
        return max((c[:-1] for c in self.continuations), key=len)

    @property
    def answers(self) -> list[int]:
        return [q.answer for q in self.questions]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _fit_subject(
    subject: str, shots: list[MMLUQuestion], questions: list[MMLUQuestion], tokenizer: Any, budget: int, bos: bool
) -> list[tuple[list[int], int, bool]]:
    """``(ids, n_shots, truncated)`` per question, dropping shots until the prompt fits."""
    out: list[tuple[list[int], int, bool] | None] = [None] * len(questions)
    pending = list(range(len(questions)))
    for k in range(len(shots), -1, -1):
        prefix = _prefix(subject, shots[:k])
        encoded = _encode(tokenizer, [prefix + format_question(questions[i], False) for i in pending], bos)
        left = []
        for i, ids in zip(pending, encoded):
            if len(ids) <= budget:
                out[i] = (ids, k, False)
            elif k == 0:
                out[i] = (ids[-budget:], 0, True)  # keep the end, as lm-evaluation-harness does
            else:
                left.append(i)
        pending = left
        if not pending:
            break
    return out  # type: ignore[return-value]


def prepare_mmlu(
    tokenizer: Any,
    questions: dict[str, list[MMLUQuestion]],
    shots: dict[str, list[MMLUQuestion]],
    config: MMLUConfig,
    max_length: int,
) -> PreparedMMLU:
    """Build and tokenize every prompt once, grouped by the prefix they share.

    Args:
        tokenizer: The model's tokenizer.
        questions: Questions per subject (from :func:`load_mmlu`).
        shots: Dev questions per subject; the first ``config.shots`` are used.
        config: ``shots`` and ``reuse_prefix`` are used.
        max_length: Token budget of a prompt plus the letter tokens fed after it.
    """
    conts = answer_continuations(tokenizer)
    extension = max((c[:-1] for c in conts), key=len)
    budget = max_length - len(extension)
    if budget < 2:
        raise InputError(f"max_length {max_length} leaves no room for a prompt; give at least {len(extension) + 2}")
    bos = tokenizer_adds_bos(tokenizer)
    flat: list[MMLUQuestion] = []
    n_shots: list[int] = []
    truncated: list[bool] = []
    groups: list[PromptGroup] = []
    full_rows: list[tuple[int, tuple[int, ...]]] = []
    for subject in sorted(questions):
        subject_shots = shots.get(subject, [])[: config.shots]
        if len(subject_shots) < config.shots:
            logger.warning("MMLU %s has %d shots (asked for %d)", subject, len(subject_shots), config.shots)
        fitted = _fit_subject(subject, subject_shots, questions[subject], tokenizer, budget, bos)
        base = len(flat)
        flat.extend(questions[subject])
        n_shots.extend(k for _, k, _ in fitted)
        truncated.extend(t for _, _, t in fitted)
        by_k: dict[int, list[int]] = {}
        for j, (ids, k, cut) in enumerate(fitted):
            if cut or not config.reuse_prefix:
                full_rows.append((base + j, tuple(ids)))
            else:
                by_k.setdefault(k, []).append(j)
        for k, members in sorted(by_k.items(), reverse=True):
            prefix_ids = _encode(tokenizer, [_prefix(subject, subject_shots[:k])], bos)[0]
            lcp = {j: _common_prefix(prefix_ids, fitted[j][0]) for j in members}
            # A question whose tokens leave the prefix's early runs in full, as do all
            # of them when the cacheable part would be empty.
            shared = [j for j in members if lcp[j] >= len(prefix_ids) - _BOUNDARY_SLACK]
            cut_at = min([lcp[j] for j in shared] + [len(fitted[j][0]) - 1 for j in shared], default=0)
            if cut_at < 1:
                shared = []
            full_rows.extend((base + j, tuple(fitted[j][0])) for j in members if j not in shared)
            if shared:
                items = tuple((base + j, tuple(fitted[j][0][cut_at:])) for j in shared)
                groups.append(PromptGroup(tuple(prefix_ids[:cut_at]), items))
    if full_rows:
        groups.append(PromptGroup((), tuple(full_rows)))
    stats = {
        "n_cached": sum(len(g.items) for g in groups if g.prefix),
        "n_full": len(full_rows),
        "n_prefixes": sum(1 for g in groups if g.prefix),
        "prefix_tokens": sum(len(g.prefix) for g in groups),
        "question_tokens": sum(len(ids) for g in groups for _, ids in g.items),
    }
    return PreparedMMLU(
        questions=tuple(flat),
        groups=tuple(groups),
        continuations=tuple(conts),
        n_shots=tuple(n_shots),
        truncated=tuple(truncated),
        max_length=max_length,
        bos=bos,
        pad_id=pad_id_of(tokenizer),
        stats=stats,
    )


# --------------------------------------------------------------------------- scoring


def _expand_cache(cache: Any, batch: int) -> Any:
    """A copy of a one-row prefix cache, repeated to ``batch`` rows."""
    expanded = copy.deepcopy(cache)
    if batch > 1:
        expanded.batch_repeat_interleave(batch)
    return expanded


@torch.no_grad()
def _score_rows(
    model: nn.Module,
    rows: list[tuple[int, ...]],
    prepared: PreparedMMLU,
    cache: Any,
    prefix_len: int,
) -> torch.Tensor:
    """Log-probability scores ``(B, 4)`` of the letters after each row's last token."""
    ext = list(prepared.extension)
    ids, mask = right_pad([list(r) + ext for r in rows], prepared.pad_id)  # (B, S)
    device = model_device(model)
    last = torch.tensor([len(r) - 1 for r in rows])  # (B,)
    positions = last[:, None] + torch.arange(len(ext) + 1)[None, :]  # (B, E+1)
    if cache is not None:
        mask = torch.cat([torch.ones(len(rows), prefix_len, dtype=torch.long), mask], dim=1)  # (B, P+S)
        cache = _expand_cache(cache, len(rows))
    logits = logits_at(model, ids.to(device), mask.to(device), positions.to(device), cache)  # (B, E+1, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    scores = torch.zeros(len(rows), len(CHOICES))
    for c, cont in enumerate(prepared.continuations):
        for j, tok in enumerate(cont):
            scores[:, c] += logp[:, j, tok].cpu()
    return scores


@torch.no_grad()
def _prefix_cache(model: nn.Module, prefix: tuple[int, ...]) -> Any:
    ids = torch.tensor([prefix], dtype=torch.long, device=model_device(model))  # (1, P)
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs)
    return output_cache(out)


def letter_logprobs(model: nn.Module, prepared: PreparedMMLU, batch_size: int = 8, show_progress: bool = True) -> torch.Tensor:
    """Scores of the four answer letters for every prepared question.

    Args:
        model: A causal LM; units masked with :func:`depthprune.units.mask_units` stay masked.
        prepared: From :func:`prepare_mmlu`; can be scored many times.
        batch_size: Questions per forward pass.
        show_progress: Show a progress bar on a terminal.

    Returns:
        ``(N, 4)`` float32 log-probabilities of A-D (for one-token letters, the argmax is
        the argmax of their logits), in the order of ``prepared.questions``.
    """
    scores = torch.zeros(len(prepared.questions), len(CHOICES))
    with counter(len(prepared.questions), "mmlu", disable=not show_progress) as bar:
        for group in prepared.groups:
            cache = _prefix_cache(model, group.prefix) if group.prefix else None
            # Longest first: rows of a batch have similar lengths, so little padding.
            items = sorted(group.items, key=lambda it: len(it[1]), reverse=True)
            for b in range(0, len(items), batch_size):
                batch = items[b : b + batch_size]
                out = _score_rows(model, [ids for _, ids in batch], prepared, cache, len(group.prefix))
                scores[torch.tensor([i for i, _ in batch])] = out
                bar.update(len(batch))
    return scores


# --------------------------------------------------------------------------- entry point


def evaluate_mmlu(model: nn.Module, tokenizer: Any, source: str | os.PathLike[str], config: MMLUConfig | None = None) -> dict[str, Any]:
    """MMLU accuracy of ``model`` in the paper's 5-shot protocol.

    Args:
        model: A causal LM, possibly with units masked.
        tokenizer: Its tokenizer.
        source: A local MMLU folder or ``cais/mmlu`` (see :func:`load_mmlu`).
        config: Shots, limit, subjects, batch size.

    Returns:
        ``{"task": "mmlu", "source", "accuracy" (= micro), "micro_accuracy",
        "macro_accuracy", "n", "higher_is_better", "subjects": {subject: {"accuracy",
        "n"}}, "predictions", "answers", "protocol"}``. ``predictions`` and ``answers``
        are letter indices, subjects in sorted order, questions in file order.
    """
    config = config or MMLUConfig()
    if tokenizer is None:
        raise InputError("the model has no tokenizer; MMLU needs one to tokenize the prompts")
    subjects = list(config.subjects) if config.subjects else None
    questions = load_mmlu(source, config.split, subjects, config.limit)
    shots = load_mmlu(source, config.shots_split, list(questions)) if config.shots else {}
    max_length = config.max_length or context_length(model) or 2048
    prepared = prepare_mmlu(tokenizer, questions, shots, config, max_length)
    scores = letter_logprobs(model, prepared, config.batch_size, config.show_progress)
    predictions = scores.argmax(dim=-1).tolist()
    answers = prepared.answers
    per_subject: dict[str, dict[str, float | int]] = {}
    start = 0
    for subject, qs in questions.items():
        hits = sum(p == a for p, a in zip(predictions[start : start + len(qs)], answers[start : start + len(qs)]))
        per_subject[subject] = {"accuracy": hits / len(qs), "n": len(qs)}
        start += len(qs)
    n = len(predictions)
    micro = sum(p == a for p, a in zip(predictions, answers)) / n
    macro = sum(s["accuracy"] for s in per_subject.values()) / len(per_subject)
    single = all(len(c) == 1 for c in prepared.continuations)
    protocol = {
        "format": "Hendrycks et al. 5-shot prompt",
        "header": HEADER,
        "shots": config.shots,
        "shots_split": config.shots_split,
        "split": config.split,
        "limit": config.limit,
        "max_length": max_length,
        "bos": prepared.bos,
        "scoring": "next_token_logit" if single else "continuation_logprob",
        "answer_tokens": {
            letter: tokenizer.convert_ids_to_tokens(list(c)) for letter, c in zip(CHOICES, prepared.continuations)
        },
        "n_shots_used": {str(k): v for k, v in sorted(Counter(prepared.n_shots).items(), reverse=True)},
        "n_truncated": sum(prepared.truncated),
        "reuse_prefix": config.reuse_prefix,
        "reference": REFERENCE,
        "config": asdict(config),
        **prepared.stats,
    }
    logger.info("MMLU micro accuracy %.4f, macro %.4f over %d questions", micro, macro, n)
    return {
        "task": "mmlu",
        "source": str(source),
        "accuracy": micro,
        "micro_accuracy": micro,
        "macro_accuracy": macro,
        "n": n,
        "higher_is_better": True,
        "subjects": per_subject,
        "predictions": predictions,
        "answers": answers,
        "protocol": protocol,
    }
