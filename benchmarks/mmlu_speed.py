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

Prints one JSON line:

- ``agreement``: fraction of questions with the same predicted letter (target >= 0.99);
- ``prompt_match``: fraction of questions whose prompt string is byte-identical;
- ``max_abs_logprob_diff``: largest difference of a letter's log-probability;
- ``time_ratio``: our end-to-end time over lm-eval's (target <= 0.5), both from the
  loaded model to the predictions (reading data, building prompts, tokenizing, forward
  passes), best of ``--repeats`` alternating runs; ``model_time_ratio``: the same for
  the model part alone (our ``letter_logprobs`` against lm-eval's ``loglikelihood``);
  ``time_ratio_no_reuse``: ours without the shared-prefix KV cache.

Usage: ``python benchmarks/mmlu_speed.py [--model DIR] [--subjects a,b] [--limit 50]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_SUBJECTS = "abstract_algebra,anatomy,conceptual_physics,management,philosophy,world_religions"

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
    p.add_argument("--model", help="a Hugging Face model folder (default: stories260K converted on the fly)")
    p.add_argument("--mmlu", default=str(SHARED / "data" / "mmlu"), help="MMLU folder with dev/ and test/ CSV files")
    p.add_argument("--subjects", default=DEFAULT_SUBJECTS, help="comma-separated subjects")
    p.add_argument("--limit", type=int, default=50, help="questions per subject")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048, help="context given to both sides")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best time counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    return p.parse_args()


def load(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any, str]:
    from depthprune.llama2c import convert_llama2c
    from depthprune.loading import load_model

    path = args.model
    if path is None:
        src = SHARED / "models" / "stories260K"
        path = str(convert_llama2c(src / "stories260K.bin", src / "tok512.bin", tmp / "stories260K"))
    loaded = load_model(path)
    return loaded.model, loaded.tokenizer, "stories260K" if args.model is None else path


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


def run_ours(model: Any, tokenizer: Any, args: argparse.Namespace, subjects: list[str], reuse: bool) -> tuple[float, dict]:
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
    start = time.perf_counter()
    result = evaluate_mmlu(model, tokenizer, args.mmlu, config)
    return time.perf_counter() - start, result


def run_theirs(model: Any, tokenizer: Any, args: argparse.Namespace, names: list[str], tmp: Path) -> tuple[float, dict]:
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
    start = time.perf_counter()
    manager = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0, log_samples=True)
    out["model_seconds"] = model_time[0]
    return time.perf_counter() - start, out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # lm-eval warns per request about its own defaults
    subjects = sorted(s.strip() for s in args.subjects.split(",") if s.strip())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model, tokenizer, model_name = load(args, tmp)
        names = write_tasks(args, tmp, subjects)
        ours_t, theirs_t, ours_model_t, theirs_model_t = [], [], [], []
        for _ in range(args.repeats):
            t, ours = run_ours(model, tokenizer, args, subjects, reuse=True)
            ours_t.append(t)
            t, theirs = run_theirs(model, tokenizer, args, names, tmp)
            theirs_t.append(t)
            theirs_model_t.append(theirs["model_seconds"])
            figures = compare(ours, theirs, names, subjects, model, tokenizer, args)
            ours_model_t.append(figures.pop("model_seconds"))
        plain_t, plain = run_ours(model, tokenizer, args, subjects, reuse=False)
    print(
        json.dumps(
            {
                "benchmark": "mmlu_speed",
                "model": model_name,
                "subjects": subjects,
                "limit": args.limit,
                "n": len(ours["predictions"]),
                "shots": args.shots,
                "max_length": args.max_length,
                "batch_size": args.batch_size,
                "threads": args.threads,
                **figures,
                "ours_s": round(min(ours_t), 3),
                "theirs_s": round(min(theirs_t), 3),
                "ours_no_reuse_s": round(plain_t, 3),
                "time_ratio": round(min(ours_t) / min(theirs_t), 4),
                "time_ratio_no_reuse": round(plain_t / min(theirs_t), 4),
                "ours_model_s": round(min(ours_model_t), 3),
                "theirs_model_s": round(min(theirs_model_t), 3),
                "model_time_ratio": round(min(ours_model_t) / min(theirs_model_t), 4),
                "no_reuse_agreement": sum(a == b for a, b in zip(plain["predictions"], ours["predictions"]))
                / len(ours["predictions"]),
                "ours_accuracy": round(ours["accuracy"], 4),
                "n_shots_used": ours["protocol"]["n_shots_used"],
                "n_truncated": ours["protocol"]["n_truncated"],
                "scoring": ours["protocol"]["scoring"],
            }
        )
    )


def compare(ours: dict, theirs: dict, names: list[str], subjects: list[str], model: Any, tokenizer: Any, args: argparse.Namespace) -> dict:
    """Agreement of predictions, prompts and letter log-probabilities."""
    from depthprune.evaluate.mmlu import MMLUConfig, build_prompt, letter_logprobs, load_mmlu, prepare_mmlu

    test = load_mmlu(args.mmlu, "test", subjects, args.limit)
    dev = load_mmlu(args.mmlu, "dev", subjects)
    prepared = prepare_mmlu(tokenizer, test, dev, MMLUConfig(shots=args.shots), args.max_length)
    start = time.perf_counter()
    scores = letter_logprobs(model, prepared, args.batch_size, show_progress=False)
    model_seconds = time.perf_counter() - start
    their_pred, their_lls, their_prompts = [], [], []
    for name in names:
        for sample in sorted(theirs["samples"][name], key=lambda s: s["doc_id"]):
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            their_lls.append(lls)
            their_pred.append(max(range(len(lls)), key=lls.__getitem__))
            their_prompts.append(sample["arguments"][0][0])
    our_prompts = [build_prompt(s, dev[s][: args.shots], q) for s in subjects for q in test[s]]
    n = len(ours["predictions"])
    answers = [q.answer for s in subjects for q in test[s]]
    return {
        "theirs_accuracy": round(sum(p == y for p, y in zip(their_pred, answers)) / n, 4),
        "agreement": sum(a == b for a, b in zip(ours["predictions"], their_pred)) / n,
        "prompt_match": sum(a == b for a, b in zip(our_prompts, their_prompts)) / n,
        "max_abs_logprob_diff": float((scores - torch.tensor(their_lls)).abs().max()),
        "model_seconds": model_seconds,
    }


if __name__ == "__main__":
    main()
