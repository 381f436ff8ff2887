"""Our MMLU against lm-evaluation-harness's 5-shot MMLU: same model, same questions, one run.

Both sides run the paper's prompt (Hendrycks et al.): header, the first five dev questions
of the subject with their answers, then the test question ending in "Answer:". lm-eval
runs it from local task YAMLs generated into a temporary folder: one task per subject,
``output_type: multiple_choice`` with choices A-D, ``fewshot_split: dev``, sampler
``first_n``, ``num_fewshot: 5``, and the same description and ``doc_to_text``. Its data
are JSONL copies of the same CSV rows, as read by ``depthprune.evaluate.mmlu.load_mmlu``
(lm-eval's CSV loader goes through pandas, whose type inference would turn choices such
as ``007`` or ``None`` into numbers or NaN, so the prompts would no longer be the same).

The default model is stories260K (converted on the fly from ``../shared/models``). Its
context is 512 tokens, but its 5-shot prompts are longer, so both sides get
``max_length=2048`` (RoPE has no hard limit): then neither side drops shots nor
truncates, and the comparison is of the two implementations, not of two truncation rules.
``--model smollm2`` runs the shared SmolLM2-135M GGUF (dequantized to float32; context
8,192) on a smaller preset: 3 subjects x 20 questions, one repeat, no no-reuse arm.

The two sides alternate (ours, lm-eval; then lm-eval, ours; ...). Prints one JSON line:

- ``agreement``: fraction of questions with the same predicted letter (target >= 0.99);
- ``prompt_match``: fraction of questions whose prompt string is byte-identical;
- ``max_abs_logprob_diff``: largest difference of a letter's log-probability;
- ``time_ratio``: our end-to-end wall time over lm-eval's (target <= 0.5), both from the
  loaded model to the predictions (reading data, building prompts, tokenizing, forward
  passes), best of ``--repeats`` runs; ``cpu_time_ratio``: the same from process CPU
  time, which other processes on a shared machine do not inflate; ``model_time_ratio``:
  the model part alone (our ``letter_logprobs`` against lm-eval's ``loglikelihood``);
  ``time_ratio_no_reuse``: ours without the shared-prefix KV cache;
- ``target_met``: both targets at once.

Files (the lm-eval task YAMLs, their JSONL data, the converted model, the datasets
cache) go to a temporary folder that is removed at the end.

Usage: ``python benchmarks/mmlu_speed.py [--model smollm2|FILE.gguf|DIR] [--subjects a,b] [--limit 50]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import SHARED, gguf_path, load_average, load_gguf

TIME_TARGET = 0.5
AGREEMENT_TARGET = 0.99
DEFAULT_SUBJECTS = "abstract_algebra,anatomy,conceptual_physics,management,philosophy,world_religions"
# What runs when --subjects/--limit/--repeats/--no-reuse-arm are not given. SmolLM2 is
# ~500x the compute of stories260K (~100-200 tokens/s on 2 shared cores): three subjects
# with short prompts and one repeat keep it to a few minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"subjects": DEFAULT_SUBJECTS, "limit": 50, "repeats": 2, "no_reuse_arm": True},
    "smollm2": {"subjects": "conceptual_physics,management,world_religions", "limit": 20, "repeats": 1, "no_reuse_arm": False},
}


@dataclass
class Run:
    """One side's run: wall and process CPU seconds end to end, seconds in the model part,
    the result, and (ours) the ``(N, 4)`` letter log-probabilities."""

    wall: float
    cpu: float
    model: float
    result: dict[str, Any]
    scores: torch.Tensor | None = None

    @staticmethod
    def best(runs: list[Run]) -> dict[str, float]:
        """The least of each figure over the repeats (each taken separately)."""
        return {k: round(min(getattr(r, k) for r in runs), 3) for k in ("wall", "cpu", "model")}


TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: {shots}
output_type: multiple_choice
description: {description}
doc_to_text: "{{{{question}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        help="'smollm2' (the shared SmolLM2-135M GGUF), a .gguf file, or a Hugging Face model folder "
        "(default: stories260K converted on the fly)",
    )
    p.add_argument("--mmlu", default=str(SHARED / "data" / "mmlu"), help="MMLU folder with dev/ and test/ CSV files")
    p.add_argument("--subjects", help="comma-separated subjects (default: the model's preset)")
    p.add_argument("--limit", type=int, help="questions per subject (default: the model's preset)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048, help="context given to both sides")
    p.add_argument("--repeats", type=int, help="alternating runs per side; the best time counts (default: the model's preset)")
    p.add_argument(
        "--no-reuse-arm",
        action=argparse.BooleanOptionalAction,
        help="also time ours without the shared-prefix cache (default: the model's preset)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    args = p.parse_args()
    preset = PRESETS["smollm2" if args.model == "smollm2" else "default"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def load(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any, str]:
    from depthprune.llama2c import convert_llama2c
    from depthprune.loading import load_model

    if args.model is None:
        src = SHARED / "models" / "stories260K"
        loaded = load_model(str(convert_llama2c(src / "stories260K.bin", src / "tok512.bin", tmp / "stories260K")))
        return loaded.model, loaded.tokenizer, "stories260K"
    if args.model == "smollm2" or args.model.endswith(".gguf"):
        path = gguf_path(args.model)
        model, tokenizer = load_gguf(path)
        return model, tokenizer, f"{path.name} (float32)"
    loaded = load_model(args.model)
    return loaded.model, loaded.tokenizer, args.model


def write_tasks(args: argparse.Namespace, tmp: Path, subjects: list[str]) -> list[str]:
    """One lm-eval task per subject, reading JSONL copies of the CSV rows."""
    from depthprune.evaluate.mmlu import HEADER, format_subject, load_mmlu

    test = load_mmlu(args.mmlu, "test", subjects, args.limit)
    dev = load_mmlu(args.mmlu, "dev", subjects)
    folder = tmp / "tasks"
    folder.mkdir()
    names = []
    for s in subjects:
        for split, data in (("test", test[s]), ("dev", dev[s])):
            with (folder / f"{s}_{split}.jsonl").open("w", encoding="utf-8") as fh:
                for q in data:
                    fh.write(json.dumps({"question": q.question, "choices": list(q.choices), "answer": q.answer}) + "\n")
        name = f"dp_mmlu_{s}"
        (folder / f"{name}.yaml").write_text(
            TASK_YAML.format(
                task=name,
                test=json.dumps(str(folder / f"{s}_test.jsonl")),
                dev=json.dumps(str(folder / f"{s}_dev.jsonl")),
                shots=args.shots,
                description=json.dumps(HEADER.format(format_subject(s))),
            ),
            encoding="utf-8",
        )
        names.append(name)
    return names


@contextmanager
def timed_letter_logprobs(record: list[tuple[float, torch.Tensor]]) -> Iterator[None]:
    """Time our model part and keep its scores: ``evaluate_mmlu`` looks up ``letter_logprobs``
    in its module on every call, so wrapping it there sees exactly what it computes."""
    from depthprune.evaluate import mmlu

    inner = mmlu.letter_logprobs

    def timed(*a: Any, **k: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        scores = inner(*a, **k)
        record.append((time.perf_counter() - t0, scores))
        return scores

    mmlu.letter_logprobs = timed
    try:
        yield
    finally:
        mmlu.letter_logprobs = inner


def run_ours(model: Any, tokenizer: Any, args: argparse.Namespace, subjects: list[str], reuse: bool) -> Run:
    from depthprune.evaluate.mmlu import MMLUConfig, evaluate_mmlu

    config = MMLUConfig(
        shots=args.shots,
        limit=args.limit,
        subjects=tuple(subjects),
        max_length=args.max_length,
        batch_size=args.batch_size,
        reuse_prefix=reuse,
        show_progress=False,
    )
    model_part: list[tuple[float, torch.Tensor]] = []
    wall, cpu = time.perf_counter(), time.process_time()
    with timed_letter_logprobs(model_part):
        result = evaluate_mmlu(model, tokenizer, args.mmlu, config)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    (model_s, scores), = model_part
    return Run(wall, cpu, model_s, result, scores)


def run_theirs(model: Any, tokenizer: Any, args: argparse.Namespace, names: list[str], tmp: Path) -> Run:
    import copy

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=args.batch_size, max_length=args.max_length)
    inner = lm.loglikelihood
    model_time = [0.0]

    def timed(*a: Any, **k: Any) -> Any:  # the model part alone: tokenizing and forward passes
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            model_time[0] += time.perf_counter() - t0

    lm.loglikelihood = timed  # type: ignore[method-assign]
    wall, cpu = time.perf_counter(), time.process_time()
    manager = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0, log_samples=True)
    return Run(time.perf_counter() - wall, time.process_time() - cpu, model_time[0], out)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # lm-eval warns per request about its own defaults
    subjects = sorted(s.strip() for s in args.subjects.split(",") if s.strip())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # The datasets library caches lm-eval's JSONL reads; keep that in the temporary folder too.
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "datasets_cache")
        model, tokenizer, model_name = load(args, tmp)
        names = write_tasks(args, tmp, subjects)
        runs: dict[str, list[Run]] = {"ours": [], "theirs": []}
        load_before = load_average()
        for r in range(args.repeats):
            for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                if side == "ours":
                    runs[side].append(run_ours(model, tokenizer, args, subjects, reuse=True))
                else:
                    runs[side].append(run_theirs(model, tokenizer, args, names, tmp))
        plain = run_ours(model, tokenizer, args, subjects, reuse=False) if args.no_reuse_arm else None
        load_after = load_average()
    ours, theirs = runs["ours"][-1], runs["theirs"][-1]
    figures = compare(ours, theirs, names, subjects, args)
    best = {side: Run.best(rs) for side, rs in runs.items()}
    time_ratio = best["ours"]["wall"] / best["theirs"]["wall"]
    figures.update(
        {
            "target": f"time_ratio <= {TIME_TARGET} and agreement >= {AGREEMENT_TARGET}",
            "target_met": time_ratio <= TIME_TARGET and figures["agreement"] >= AGREEMENT_TARGET,
            "time_ratio": round(time_ratio, 4),
            "cpu_time_ratio": round(best["ours"]["cpu"] / best["theirs"]["cpu"], 4),
            "model_time_ratio": round(best["ours"]["model"] / best["theirs"]["model"], 4),
            "ours_s": best["ours"],
            "theirs_s": best["theirs"],
        }
    )
    if plain is not None:
        figures["ours_no_reuse_s"] = {"wall": round(plain.wall, 3), "cpu": round(plain.cpu, 3)}
        figures["time_ratio_no_reuse"] = round(plain.wall / best["theirs"]["wall"], 4)
        figures["no_reuse_agreement"] = sum(a == b for a, b in zip(plain.result["predictions"], ours.result["predictions"])) / len(
            ours.result["predictions"]
        )
    print(
        json.dumps(
            {
                "benchmark": "mmlu_speed",
                "model": model_name,
                "subjects": subjects,
                "limit": args.limit,
                "n": len(ours.result["predictions"]),
                "shots": args.shots,
                "max_length": args.max_length,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "repeats": args.repeats,
                **figures,
                "ours_accuracy": round(ours.result["accuracy"], 4),
                "n_shots_used": ours.result["protocol"]["n_shots_used"],
                "n_truncated": ours.result["protocol"]["n_truncated"],
                "scoring": ours.result["protocol"]["scoring"],
                "load_average_1min": [load_before, load_after],
            }
        )
    )


def compare(ours: Run, theirs: Run, names: list[str], subjects: list[str], args: argparse.Namespace) -> dict:
    """Agreement of predictions, prompts and letter log-probabilities."""
    from depthprune.evaluate.mmlu import build_prompt, load_mmlu

    test = load_mmlu(args.mmlu, "test", subjects, args.limit)
    dev = load_mmlu(args.mmlu, "dev", subjects)
    their_pred, their_lls, their_prompts = [], [], []
    for name in names:
        for sample in sorted(theirs.result["samples"][name], key=lambda s: s["doc_id"]):
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            their_lls.append(lls)
            their_pred.append(max(range(len(lls)), key=lls.__getitem__))
            their_prompts.append(sample["arguments"][0][0])
    our_prompts = [build_prompt(s, dev[s][: args.shots], q) for s in subjects for q in test[s]]
    predictions = ours.result["predictions"]
    n = len(predictions)
    answers = [q.answer for s in subjects for q in test[s]]
    return {
        "theirs_accuracy": round(sum(p == y for p, y in zip(their_pred, answers)) / n, 4),
        "agreement": sum(a == b for a, b in zip(predictions, their_pred)) / n,
        "prompt_match": sum(a == b for a, b in zip(our_prompts, their_prompts)) / n,
        "max_abs_logprob_diff": float((ours.scores - torch.tensor(their_lls)).abs().max()),
    }


if __name__ == "__main__":
    main()
