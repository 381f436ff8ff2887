"""Value functions: what the model is worth with a coalition of units present.

A value function turns the logits of one batch into a weighted sum; the value of a
coalition is the total sum over all batches divided by the total weight, so it does not
depend on how the data is split into batches. Higher is better for every value:

- ``loss``: the negative calibration LM loss (mean token cross-entropy),
- ``kl``: the negative mean token KL divergence from the full model's next-token
  distribution (0 for the full model),
- ``mmlu``: the negative mean loss, or the 0/1 accuracy, of multiple-choice questions,
  read from the logits of the answer letters at the answer position.

Value functions are registered with :func:`register_value` and built with
:func:`make_value`. :class:`MultipleChoiceValue` is the generic multiple-choice value;
the ``mmlu`` value is a thin loader around it that uses the evaluation code's MMLU
prompts (``depthprune.evaluate.mmlu``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from depthprune.data import CalibrationInfo, TokenBatches
from depthprune.errors import InputError, check_choice
from depthprune.registry import Registry
from depthprune.score.registry import DEEPER_LOOK

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids (B, T), attention_mask (B, T)
TaskMetric = Literal["loss", "accuracy"]
TASK_METRICS: tuple[TaskMetric, ...] = ("loss", "accuracy")


class ValueFunction(ABC):
    """The value of a masked model on fixed inputs.

    A subclass says which batches to run (:meth:`batches`) and turns each batch's logits
    into ``(sum, weight)`` (:meth:`contribution`); the value is ``sum(sums) / sum(weights)``
    over all batches. Weights must not depend on which units are masked.

    A value function serves one batch split at a time (the last :meth:`batches` call);
    games that share one must use the same batch size.

    Attributes:
        name: The registry key.
        needs_reference: Whether :meth:`reference` must see the full model's logits of
            every batch before any other evaluation.
    """

    name: str = ""
    needs_reference: bool = False

    @abstractmethod
    def batches(self, batch_size: int) -> list[Batch]:
        """The inputs, as ``(input_ids, attention_mask)`` pairs of at most ``batch_size`` rows.

        The same call must always give the same batches.
        """

    def reference(self, index: int, logits: torch.Tensor) -> None:
        """Remember what the full (unmasked) model gives on batch ``index`` ``(B, T, V)``."""

    @abstractmethod
    def contribution(self, index: int, logits: torch.Tensor) -> tuple[float, float]:
        """``(sum, weight)`` of batch ``index`` from its logits ``(B, T, V)``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the value is and what it was computed on, for results and checkpoints."""

    @property
    @abstractmethod
    def calibration(self) -> CalibrationInfo:
        """The inputs' provenance, as recorded in ``scores.json``."""


@dataclass(frozen=True)
class ValueSpec:
    """One registered value function.

    Attributes:
        name: Registry key (``--value``).
        definition: What the number is; higher is always better.
        reference: The paper the value comes from.
        build: Makes the value function from a :class:`ValueConfig` and the inputs.
    """

    name: str
    definition: str
    reference: str
    build: Callable[..., ValueFunction]


VALUES: Registry[ValueSpec] = Registry("value")


def register_value(name: str, definition: str, reference: str) -> Callable[[Callable[..., ValueFunction]], Callable[..., ValueFunction]]:
    """Register the decorated builder ``build(config, data, tokenizer, max_context)`` as a value."""

    def add(build: Callable[..., ValueFunction]) -> Callable[..., ValueFunction]:
        VALUES.add(name, ValueSpec(name, definition, reference, build))
        return build

    return add


def get_value(name: str) -> ValueSpec:
    """Look a value function up, suggesting the closest name on a miss."""
    return VALUES.get(name)


@dataclass(frozen=True)
class ValueConfig:
    """Which value function, and the options of the task value.

    Attributes:
        name: A registered value: ``loss``, ``kl`` or ``mmlu``.
        mmlu: The MMLU folder (``dev/`` and ``test/`` with ``<subject>_<split>.csv``), for ``mmlu``.
        split: The MMLU split whose questions are scored.
        subjects: MMLU subjects to use; all when ``None``.
        limit: At most this many questions per subject.
        shots: Solved dev questions put before each question.
        task_metric: ``loss`` (negative mean loss over the 4 letters) or ``accuracy`` (0/1).
    """

    name: str = "loss"
    mmlu: str | None = None
    split: str = "test"
    subjects: tuple[str, ...] | None = None
    limit: int | None = None
    shots: int = 5
    task_metric: TaskMetric = "loss"

    def __post_init__(self) -> None:
        get_value(self.name)
        check_choice(self.task_metric, TASK_METRICS, "task metric")
        if self.shots < 0:
            raise InputError(f"shots must be 0 or more, got {self.shots}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be at least 1 question per subject, got {self.limit}")
        if self.name == "mmlu" and not self.mmlu:
            raise InputError("the mmlu value needs the MMLU data folder; pass --mmlu PATH (with dev/ and test/ inside)")


def make_value(
    config: ValueConfig | str,
    data: TokenBatches | None = None,
    tokenizer: Any | None = None,
    max_context: int | None = None,
) -> ValueFunction:
    """Build a value function.

    Args:
        config: A :class:`ValueConfig`, or just a value name.
        data: Calibration tokens, for ``loss`` and ``kl``.
        tokenizer: The model's tokenizer, for ``mmlu``.
        max_context: The model's context length; longer task prompts are shortened.

    Raises:
        InputError: unknown value, or an input it needs is missing.
    """
    config = ValueConfig(config) if isinstance(config, str) else config
    return get_value(config.name).build(config, data, tokenizer, max_context)


# --------------------------------------------------------------------------- LM values


class _TokenValue(ValueFunction):
    """Shared base of values computed on packed calibration tokens."""

    def __init__(self, data: TokenBatches) -> None:
        self.data = data
        self._current: list[Batch] = []

    def batches(self, batch_size: int) -> list[Batch]:
        self._current = list(self.data.batches(batch_size))
        return self._current

    @staticmethod
    def _targets(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = mask[:, 1:].bool() & mask[:, :-1].bool()  # (B, T-1)
        return ids[:, 1:].to(torch.long), valid

    @property
    def calibration(self) -> CalibrationInfo:
        return self.data.info

    def describe(self) -> dict[str, Any]:
        return {"value": self.name, "definition": VALUES.get(self.name).definition, "data_sha256": self.data.info.sha256}


class LossValue(_TokenValue):
    """Negative mean next-token cross-entropy over the calibration tokens."""

    name = "loss"

    def contribution(self, index: int, logits: torch.Tensor) -> tuple[float, float]:
        ids, mask = self._current[index]
        targets, valid = self._targets(ids.to(logits.device), mask.to(logits.device))
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")  # (B*(T-1),)
        w = valid.flatten()
        return -float(nll[w].double().sum()), float(w.sum())


class KLValue(_TokenValue):
    """Negative mean over tokens of KL(p_full || p_masked) of the next-token distribution."""

    name = "kl"
    needs_reference = True

    def __init__(self, data: TokenBatches) -> None:
        super().__init__(data)
        self._ref: dict[int, torch.Tensor] = {}

    def reference(self, index: int, logits: torch.Tensor) -> None:
        self._ref[index] = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)

    def contribution(self, index: int, logits: torch.Tensor) -> tuple[float, float]:
        if index not in self._ref:
            raise RuntimeError("the kl value needs reference() of every batch before contribution()")
        ids, mask = self._current[index]
        _, valid = self._targets(ids.to(logits.device), mask.to(logits.device))
        logp_full = self._ref[index]
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        kl = (logp_full.exp() * (logp_full - logp)).sum(-1)  # (B, T-1)
        return -float(kl[valid].double().sum()), float(valid.sum())


def _need_data(data: TokenBatches | None, name: str) -> TokenBatches:
    if data is None:
        raise InputError(f"the {name} value needs calibration text; pass --data PATH")
    return data


@register_value("loss", "negative calibration LM loss: -(mean next-token cross-entropy over all calibration tokens)", DEEPER_LOOK)
def _build_loss(config: ValueConfig, data: TokenBatches | None, tokenizer: Any, max_context: int | None) -> ValueFunction:
    return LossValue(_need_data(data, "loss"))


@register_value(
    "kl",
    "negative mean over calibration tokens of KL(p_full || p_coalition) of the next-token distribution; 0 for the full model",
    DEEPER_LOOK,
)
def _build_kl(config: ValueConfig, data: TokenBatches | None, tokenizer: Any, max_context: int | None) -> ValueFunction:
    return KLValue(_need_data(data, "kl"))


# --------------------------------------------------------------------------- multiple choice


class MultipleChoiceValue(ValueFunction):
    """Multiple-choice questions scored from the answer letters' log-probabilities.

    The answer position is each prompt's last token. A choice's score is the
    log-probability of its answer tokens there: a single token (a letter such as ``" A"``)
    is read at the answer position; a continuation of several tokens (a byte-fallback
    vocabulary may write ``" A"`` as ``" "``, ``"A"``) is scored by teacher forcing, which
    works in one pass when all multi-token continuations share everything but their
    last token (the shared tokens are appended to every prompt). The choices' scores
    are normalized over the choices.

    Args:
        prompts: Token ids of each prompt, ending where the answer would follow.
        letter_ids: Per choice, its token id, or the tuple of its continuation's ids.
        answers: Index of the right choice of each prompt.
        metric: ``loss`` (the value is minus the mean cross-entropy over the choices) or
            ``accuracy`` (the fraction answered right, by the highest score).
        pad_id: Token used to right-pad prompts in a batch (never attended to).
        source: Where the questions came from, for provenance.
        max_length: Cut longer prompts (with the shared continuation) from the left.

    Raises:
        InputError: no prompts, mismatched answers, repeated or unusable continuations.
    """

    name = "multiple_choice"

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        letter_ids: Sequence[int | Sequence[int]],
        answers: Sequence[int],
        metric: TaskMetric = "loss",
        pad_id: int = 0,
        source: str = "<questions>",
        max_length: int | None = None,
    ) -> None:
        if not prompts:
            raise InputError("no multiple-choice questions given; expected at least one prompt")
        if len(prompts) != len(answers):
            raise InputError(f"got {len(prompts)} prompts but {len(answers)} answers; expected one answer per prompt")
        conts = [(int(c),) if isinstance(c, int) else tuple(int(t) for t in c) for c in letter_ids]
        if len(conts) < 2 or len(set(conts)) != len(conts) or any(not c for c in conts):
            raise InputError(f"answer tokens {conts} must be at least 2 distinct, non-empty continuations, one per choice")
        bad = [a for a in answers if not 0 <= a < len(conts)]
        if bad:
            raise InputError(f"answer {bad[0]} is out of range; expected 0..{len(conts) - 1} (one per choice)")
        if any(len(p) == 0 for p in prompts):
            raise InputError("a multiple-choice prompt is empty; every prompt needs at least one token")
        check_choice(metric, TASK_METRICS, "task metric")
        heads = {c[:-1] for c in conts if len(c) > 1}
        if len(heads) > 1:
            raise InputError(
                f"answer continuations {conts} differ before their last token, which needs a pass per choice; "
                "expected single tokens, or continuations that share all but their last token"
            )
        self.shared: tuple[int, ...] = next(iter(heads), ())
        self.conts = conts
        body = [list(map(int, p)) for p in prompts]
        if max_length is not None:
            keep = max_length - len(self.shared)
            if keep < 1:
                raise InputError(f"max_length {max_length} leaves no room for a prompt before the answer tokens")
            cut = sum(len(p) > keep for p in body)
            if cut:
                logger.warning("%d prompts were cut from the left to fit %d tokens", cut, max_length)
            body = [p[-keep:] for p in body]
        self.prompts = body
        self.answers = torch.tensor(list(answers), dtype=torch.long)
        self.metric = metric
        self.pad_id = pad_id
        self.source = source
        self._current: list[tuple[Batch, torch.Tensor, torch.Tensor]] = []

    def batches(self, batch_size: int) -> list[Batch]:
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        out = []
        for start in range(0, len(self.prompts), batch_size):
            rows = [p + list(self.shared) for p in self.prompts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            at = torch.tensor([len(p) - 1 for p in self.prompts[start : start + batch_size]])  # (B,) answer position
            out.append(((ids, mask), at, self.answers[start : start + batch_size]))
        self._current = out
        return [b for b, _, _ in out]

    def choice_scores(self, index: int, logits: torch.Tensor) -> torch.Tensor:
        """Log-probability of each choice's continuation ``(B, C)`` in batch ``index``."""
        _, at, _ = self._current[index]
        at = at.to(logits.device)
        rows = torch.arange(logits.shape[0], device=logits.device)
        steps = [F.log_softmax(logits[rows, at + t].float(), dim=-1) for t in range(len(self.shared) + 1)]  # (B, V) each
        shared = sum((steps[t][:, tok] for t, tok in enumerate(self.shared)), torch.zeros(len(rows), device=logits.device))
        cols = []
        for c in self.conts:
            cols.append(steps[0][:, c[0]] if len(c) == 1 else shared + steps[len(c) - 1][:, c[-1]])
        return torch.stack(cols, dim=-1)

    def contribution(self, index: int, logits: torch.Tensor) -> tuple[float, float]:
        _, _, answers = self._current[index]
        scores = self.choice_scores(index, logits)  # (B, C)
        answers = answers.to(scores.device)
        if self.metric == "accuracy":
            right = (scores.argmax(-1) == answers).double()
            return float(right.sum()), float(answers.numel())
        loss = F.cross_entropy(scores, answers, reduction="none").double()
        return -float(loss.sum()), float(answers.numel())

    def _digest(self) -> str:
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(",".join(map(str, p)).encode())
            h.update(b"|")
        h.update(repr(self.conts).encode())
        h.update(",".join(map(str, self.answers.tolist())).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "value": self.name,
            "metric": self.metric,
            "definition": (
                "fraction of questions whose right answer has the highest log-probability at the answer position"
                if self.metric == "accuracy"
                else "negative mean cross-entropy of the right answer among the choices' log-probabilities at the answer position"
            ),
            "n_questions": len(self.prompts),
            "answer_tokens": [list(c) for c in self.conts],
            "data_sha256": self._digest(),
        }

    @property
    def calibration(self) -> CalibrationInfo:
        return CalibrationInfo(
            source=self.source,
            n_sequences=len(self.prompts),
            seq_len=max(len(p) for p in self.prompts) + len(self.shared),
            n_tokens=sum(len(p) for p in self.prompts) + len(self.shared) * len(self.prompts),
            sha256=self._digest(),
            seed=0,
            bos=False,
        )


def _mmlu_module() -> Any:
    if importlib.util.find_spec("depthprune.evaluate") is None or importlib.util.find_spec("depthprune.evaluate.mmlu") is None:
        raise InputError("the mmlu value needs depthprune.evaluate.mmlu, which this install lacks; use --value loss or kl")
    return importlib.import_module("depthprune.evaluate.mmlu")


def _answer_tokens(mmlu: Any, tokenizer: Any) -> list[tuple[int, ...]]:
    """Each letter's tokens after ``Answer:``; several tokens where the vocabulary needs them."""
    if hasattr(mmlu, "answer_continuations"):
        return [tuple(c) for c in mmlu.answer_continuations(tokenizer)]
    return [(int(t),) for t in mmlu.answer_token_ids(tokenizer)]


def mmlu_prompts(
    config: ValueConfig, tokenizer: Any, max_context: int | None = None
) -> tuple[list[list[int]], list[tuple[int, ...]], list[int]]:
    """Tokenized MMLU prompts, the answer letters' tokens and the answers.

    Each prompt has ``config.shots`` solved dev questions of its subject before it, built
    by the evaluation code (``build_prompt``). A prompt longer than ``max_context`` (less
    room for the answer tokens) drops shots until it fits; one that does not fit even
    without shots is cut from the left later.
    """
    from depthprune.data import tokenizer_adds_bos

    mmlu = _mmlu_module()
    subjects = list(config.subjects) if config.subjects else None
    questions = mmlu.load_mmlu(config.mmlu, split=config.split, subjects=subjects, limit=config.limit)
    dev = mmlu.load_mmlu(config.mmlu, split="dev", subjects=list(questions)) if config.shots else {}
    conts = _answer_tokens(mmlu, tokenizer)
    room = None if max_context is None else max_context - max(len(c) for c in conts) + 1
    head = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []

    def encode(text: str) -> list[int]:
        # As the evaluation code tokenizes: BOS when the tokenizer adds one, never an EOS.
        return head + list(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompts: list[list[int]] = []
    answers: list[int] = []
    fewer = 0
    for subject, items in questions.items():
        shots = list(dev.get(subject, []))[: config.shots]
        for q in items:
            for n_shots in range(len(shots), -1, -1):
                ids = encode(mmlu.build_prompt(subject, shots[:n_shots], q))
                if room is None or len(ids) <= room:
                    break
            fewer += n_shots < len(shots)
            prompts.append(ids)
            answers.append(int(q.answer))
    if fewer:
        logger.warning("%d MMLU prompts got fewer than %d shots to fit the context of %s tokens", fewer, config.shots, max_context)
    return prompts, conts, answers


@register_value(
    "mmlu",
    "MMLU-style multiple choice from the answer letters' log-probabilities at the answer position: the negative "
    "mean cross-entropy of the right letter (task_metric=loss) or the 0/1 accuracy (task_metric=accuracy)",
    f"{DEEPER_LOOK} (loss Shapley on MMLU)",
)
def _build_mmlu(config: ValueConfig, data: TokenBatches | None, tokenizer: Any, max_context: int | None) -> ValueFunction:
    if tokenizer is None:
        raise InputError("the mmlu value needs the model's tokenizer, and the model has none")
    prompts, conts, answers = mmlu_prompts(config, tokenizer, max_context)
    pad = getattr(tokenizer, "pad_token_id", None)
    value = MultipleChoiceValue(
        prompts, conts, answers, metric=config.task_metric, pad_id=0 if pad is None else pad,
        source=str(config.mmlu), max_length=max_context,
    )
    value.name = "mmlu"
    return value
