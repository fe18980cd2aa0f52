# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Answer synthetic task rows with the reference model through the kvpress pipeline, and score them.

    python reference/evaluate.py [--model_dir DIR] [--rows 20] [--seeds 11,12] [--context_length 1024] [--output F]

prints the full-cache accuracy per task of a checkpoint on held-out rows (`rows` per task and seed) and writes it as
JSON.

The one idea: every accuracy of the reference model (training report, quality table, tests) goes through the public
`"kv-press-text-generation"` pipeline, question-agnostic (the context is compressed before the question is seen) or
question-aware (the question is appended to the compressed context), and is scored with RULER's string matching
(https://arxiv.org/abs/2404.06654).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Optional

import torch

from harness.reference_model import REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH
from harness.synthetic.scoring import row_score
from reference import cuda_evaluation_attention, write_report


def load_reference(path: str | Path = REFERENCE_MODEL_DIR, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The reference model (eval mode) and its tokenizer, loaded offline from `path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def make_pipeline(model, tokenizer):
    """The kvpress pipeline around an already loaded model."""
    import kvpress  # noqa: F401  (registers the pipeline task)
    from kvpress.pipeline import KVPressTextGenerationPipeline

    return KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device=model.device)


@torch.no_grad()
def predict(pipe, rows: Iterable[dict], press=None, question_aware: bool = False) -> list[str]:
    """The pipeline's answer to each row. Question-aware: the question is part of the compressed context."""
    answers = []
    for row in rows:
        if question_aware:
            context, question = row["context"] + row["question"], ""
        else:
            context, question = row["context"], row["question"]
        output = pipe(
            context,
            question=question,
            answer_prefix=row["answer_prefix"],
            press=press,
            max_new_tokens=int(row["max_new_tokens"]),
        )
        answers.append(output["answer"])
    return answers


def accuracy(rows: list[dict], predictions: list[str], by_task: bool = True) -> dict[str, float]:
    """Percent of expected strings found, per task (and "all": the mean over tasks)."""
    per_task: dict[str, list[float]] = {}
    for row, prediction in zip(rows, predictions):
        per_task.setdefault(row["task"], []).append(row_score(prediction, row["answer"]))
    result = {task: 100 * sum(scores) / len(scores) for task, scores in sorted(per_task.items())}
    result["all"] = sum(result.values()) / len(result) if result else float("nan")
    return result if by_task else {"all": result["all"]}


def evaluate(pipe, rows: list[dict], press=None, question_aware: bool = False) -> tuple[dict[str, float], list[str]]:
    predictions = predict(pipe, rows, press=press, question_aware=question_aware)
    return accuracy(rows, predictions), predictions


def first_mismatches(rows: list[dict], predictions: list[str], limit: int = 3) -> list[str]:
    """A few wrong answers, for logs."""
    lines = []
    for row, prediction in zip(rows, predictions):
        if row_score(prediction, row["answer"]) < 1.0:
            lines.append(f"{row['task']}: expected {row['answer']} got {prediction!r}")
        if len(lines) >= limit:
            break
    return lines


def optional_device(device: Optional[str]) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def main(argv: Optional[list[str]] = None) -> dict:
    from tqdm import tqdm

    from harness.synthetic.tasks import TASK_NAMES, generate_rows

    parser = argparse.ArgumentParser(description="Full-cache accuracy of a reference checkpoint on held-out rows.")
    parser.add_argument("--model_dir", default=str(REFERENCE_MODEL_DIR))
    parser.add_argument("--rows", type=int, default=20, help="rows per task and seed")
    parser.add_argument("--seeds", type=_seeds, default=[11, 12], help="comma-separated generate_rows seeds")
    parser.add_argument("--context_length", type=int, default=TRAINED_CONTEXT_LENGTH)
    parser.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated task names")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default=None, help="JSON file for the result")
    args = parser.parse_args(argv)
    tasks = [task for task in args.tasks.split(",") if task]
    unknown = sorted(set(tasks) - set(TASK_NAMES))
    if unknown:
        parser.error(f"unknown tasks {unknown}; tasks: {', '.join(TASK_NAMES)}")
    if args.rows < 1:
        parser.error(f"--rows must be at least 1, got {args.rows}")
    device = optional_device(args.device)
    if device.startswith("cuda"):
        cuda_evaluation_attention()
    model, tokenizer = load_reference(args.model_dir, device)
    pipe = make_pipeline(model, tokenizer)
    rows = [
        row
        for seed in args.seeds
        for task in tasks
        for row in generate_rows(task, args.rows, args.context_length, tokenizer, seed=seed)
    ]
    predictions = predict(pipe, tqdm(rows, desc="rows", mininterval=5))
    result = accuracy(rows, predictions)
    for task, value in result.items():
        print(f"{task:24s} {value:5.1f}")
    for line in first_mismatches(rows, predictions):
        print("wrong:", line)
    report = {
        "model_dir": str(args.model_dir),
        "context_length": args.context_length,
        "rows_per_task": args.rows * len(args.seeds),
        "seeds": args.seeds,
        "accuracy": result,
    }
    return write_report(args.output, report)


if __name__ == "__main__":
    main()
