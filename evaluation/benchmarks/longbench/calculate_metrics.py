# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""LongBench metrics (https://arxiv.org/abs/2308.14508): one task-specific metric per dataset, best over references.

The one idea: every LongBench task has its own automatic metric (token F1 for QA, ROUGE-L for summaries, accuracy for
classification and retrieval, edit similarity for code); a prediction gets the best score over its ground truths and
the task score is the mean, in percent. LongBench-E reports the same per length bucket (0-4k, 4-8k, 8k+ words).
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Sequence

import pandas as pd

from evaluation.benchmarks.text_normalization import (
    as_list,
    jieba_words,
    normalize_answer,
    qa_f1,
    qa_f1_zh_words,
)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return qa_f1(prediction, ground_truth)


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return qa_f1_zh_words(prediction, ground_truth)


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F1 (the `rouge` package); 0 when it cannot be computed (e.g. an empty prediction)."""
    from rouge import Rouge

    try:
        return float(Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError):
        return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F1 on jieba words joined by spaces."""
    return rouge_score(" ".join(jieba_words(prediction)), " ".join(jieba_words(ground_truth)))


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **kwargs) -> float:
    """1/k when the right class is among the k class names found in the prediction, else 0.

    Class names found only as part of the right class's name (e.g. "ham" inside "hamster" when "hamster" is right)
    do not count as competitors.
    """
    found = [name for name in as_list(all_classes) if isinstance(name, str) and name in prediction]
    found = [name for name in found if not (name in ground_truth and name != ground_truth)]
    return 1.0 / len(found) if ground_truth in found else 0.0


def _fraction_of_numbers_equal_to(prediction: str, expected: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == expected for number in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the numbers in the prediction equal to the paragraph number of `Paragraph N` in the truth."""
    match = re.findall(r"Paragraph (\d+)", ground_truth)
    return _fraction_of_numbers_equal_to(prediction, match[0]) if match else 0.0


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Same as `retrieval_score` with the Chinese pattern `段落N`."""
    match = re.findall("\u6bb5\u843d(\\d+)", ground_truth)
    return _fraction_of_numbers_equal_to(prediction, match[0]) if match else 0.0


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the numbers in the prediction equal to the true count."""
    return _fraction_of_numbers_equal_to(prediction, str(ground_truth))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Edit similarity (fuzzywuzzy ratio / 100) of the first generated line that is not a comment or a fence."""
    with warnings.catch_warnings():  # "slow pure-python SequenceMatcher": same ratios, only slower
        warnings.simplefilter("ignore")
        from fuzzywuzzy import fuzz

    first_line = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first_line = line
            break
    return fuzz.ratio(first_line, ground_truth) / 100


DATASET_TO_METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
# Few-shot tasks whose answer is the first line of the generation.
FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum", "lsht")


def _metric_for(task: str) -> Callable[..., float]:
    if task not in DATASET_TO_METRIC:
        raise ValueError(f"Unknown LongBench task {task!r}; known tasks: {sorted(DATASET_TO_METRIC)}.")
    return DATASET_TO_METRIC[task]


def score_prediction(task: str, prediction, answers, all_classes, strip: str | None = None) -> float:
    """Best score of one prediction over its ground truths (`strip` characters are stripped on the left)."""
    metric = _metric_for(task)
    prediction = prediction if isinstance(prediction, str) else ""
    prediction = prediction.lstrip(strip)
    if task in FIRST_LINE_TASKS:
        prediction = prediction.split("\n")[0]
    return max(metric(prediction, str(truth), all_classes=all_classes) for truth in as_list(answers))


def scorer(task: str, predictions: Sequence, answers: Sequence, all_classes: Sequence) -> float:
    """Mean best-over-references score of `task`, in percent (2 decimals)."""
    scores = [score_prediction(task, p, a, c) for p, a, c in zip(predictions, answers, all_classes)]
    return round(100 * sum(scores) / len(scores), 2)


def scorer_e(task: str, predictions: Sequence, answers: Sequence, lengths: Sequence, all_classes: Sequence) -> dict:
    """Mean score per length bucket (`0-4k`, `4-8k`, `8k+`, by the `length` column), in percent (2 decimals)."""
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for prediction, truths, length, classes in zip(predictions, answers, lengths, all_classes):
        bucket = "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"
        buckets[bucket].append(score_prediction(task, prediction, truths, classes, strip="\n"))
    # A bucket without rows is left out (its mean is undefined).
    return {name: round(100 * sum(values) / len(values), 2) for name, values in buckets.items() if values}


def _single_task(df: pd.DataFrame, suffix: str = "") -> str:
    tasks = df["task"].unique()
    if len(tasks) != 1:
        raise ValueError(f"LongBench metrics score one task at a time; the predictions hold tasks {sorted(tasks)}.")
    task = str(tasks[0])
    return task[: -len(suffix)] if suffix and task.endswith(suffix) else task


def _all_classes(df: pd.DataFrame) -> list:
    if "all_classes" in df.columns:
        return [classes if classes is not None else [] for classes in df["all_classes"]]
    return [[] for _ in range(len(df))]


def calculate_metrics(df: pd.DataFrame) -> float:
    """LongBench score of one task (columns `task`, `answers`, `predicted_answer`, optional `all_classes`)."""
    task = _single_task(df)
    return scorer(task, list(df["predicted_answer"]), list(df["answers"]), _all_classes(df))


def calculate_metrics_e(df: pd.DataFrame) -> dict:
    """LongBench-E scores of one task per length bucket (also needs the `length` column)."""
    task = _single_task(df, suffix="_e")
    task = task[: -len("-e")] if task.endswith("-e") else task
    return scorer_e(task, list(df["predicted_answer"]), list(df["answers"]), list(df["length"]), _all_classes(df))


__all__ = ["calculate_metrics", "calculate_metrics_e", "scorer", "scorer_e", "normalize_answer"]
