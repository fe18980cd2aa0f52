# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ZeroSCROLLS metrics (https://arxiv.org/abs/2305.14196): the per-task metrics of the benchmark's paper.

The one idea: the test answers of ZeroSCROLLS are private (predictions are scored by the official leaderboard), so a
test-set run has nothing to score and returns `{}` as upstream does. When the rows do carry answers (the public
validation split, or a local file), each task is scored with the paper's metric: the geometric mean of ROUGE-1/2/L
for summaries, token F1 for QA, option accuracy for QuALITY, exponential similarity of the percentage for
SpaceDigest and the concordance index of the predicted order for BookSumSort. Scores are percentages.
"""

from __future__ import annotations

import logging
import re
from itertools import combinations
from typing import Callable, Optional

import pandas as pd

from evaluation.benchmarks.text_normalization import as_list, mean, normalize_answer, to_ascii, token_f1

logger = logging.getLogger(__name__)


def _rouge_f(prediction: str, reference: str) -> tuple[float, float, float]:
    from rouge import Rouge

    try:
        scores = Rouge().get_scores([prediction], [reference])[0]
    except (ValueError, RecursionError):
        return 0.0, 0.0, 0.0
    return scores["rouge-1"]["f"], scores["rouge-2"]["f"], scores["rouge-l"]["f"]


def rouge_geometric_mean(prediction: str, references: list[str]) -> float:
    """Geometric mean of ROUGE-1, ROUGE-2 and ROUGE-L F1, each the best over references."""
    per_reference = [_rouge_f(prediction, reference) for reference in references]
    best = [max(scores[i] for scores in per_reference) for i in range(3)]
    return float((best[0] * best[1] * best[2]) ** (1 / 3))


def f1(prediction: str, references: list[str]) -> float:
    """Token F1 after ASCII transliteration and SQuAD normalisation, best over references."""
    tokens = normalize_answer(to_ascii(prediction)).split()
    return max(token_f1(tokens, normalize_answer(to_ascii(reference)).split()) for reference in references)


def _first_option_letter(text: str) -> Optional[str]:
    match = re.search(r"\b([ABCD])\b", text)
    return match.group(1) if match else None


def option_accuracy(prediction: str, references: list[str]) -> float:
    """1 when the first option letter (A-D, on word boundaries) of the prediction is the reference's letter."""
    predicted = _first_option_letter(prediction)
    return float(predicted is not None and predicted in {_first_option_letter(reference) for reference in references})


def _first_percentage(text: str, require_sign: bool) -> Optional[float]:
    match = re.search(r"(\d+(?:\.\d+)?)\s*%" if require_sign else r"(\d+(?:\.\d+)?)", text)
    return float(match.group(1)) if match else None


def exponential_similarity(prediction: str, references: list[str]) -> float:
    """`2 ** (-10 * |p - p_hat|)` for fractions p (halved every 10 points); 0 when no percentage is predicted."""
    predicted = _first_percentage(prediction, require_sign=True)
    expected = _first_percentage(references[0], require_sign=False)
    if predicted is None or expected is None:
        return 0.0
    return float(2 ** (-10 * abs(predicted - expected) / 100))


def _permutation(text: str) -> list[int]:
    kept = re.sub(r"[^0-9,\s]", "", text)
    return [int(number) for number in re.split(r"[,\s]+", kept) if number]


def concordance_index(prediction: str, references: list[str]) -> float:
    """Fraction of the pairs of the reference order kept in the predicted order; 0 when it is not a permutation."""
    expected = _permutation(references[0])
    predicted = _permutation(prediction)
    if len(expected) < 2 or sorted(predicted) != sorted(expected) or len(set(expected)) != len(expected):
        return 0.0
    position = {value: index for index, value in enumerate(predicted)}
    pairs = list(combinations(expected, 2))
    return sum(position[first] < position[second] for first, second in pairs) / len(pairs)


TASK_TO_METRIC: dict[str, Callable[[str, list[str]], float]] = {
    "gov_report": rouge_geometric_mean,
    "summ_screen_fd": rouge_geometric_mean,
    "qmsum": rouge_geometric_mean,
    "squality": rouge_geometric_mean,
    "qasper": f1,
    "narrative_qa": f1,
    "musique": f1,
    "quality": option_accuracy,
    "space_digest": exponential_similarity,
    "book_sum_sort": concordance_index,
}


def _references(answer) -> list[str]:
    return [str(reference) for reference in as_list(answer) if isinstance(reference, str) and reference.strip()]


def calculate_metrics(df: pd.DataFrame) -> dict:
    """`{task: score}` in percent for the rows that have answers; `{}` when no row has one (the private test set)."""
    if "answer" not in df.columns:
        return {}
    references = [_references(answer) for answer in df["answer"]]
    if not any(references):
        logger.info("ZeroSCROLLS test answers are private: submit predictions.csv to the official leaderboard.")
        return {}
    metrics = {}
    for task in sorted(str(task) for task in df["task"].unique()):
        if task not in TASK_TO_METRIC:
            raise ValueError(f"Unknown ZeroSCROLLS task {task!r}; known tasks: {sorted(TASK_TO_METRIC)}.")
        scores = [
            TASK_TO_METRIC[task](prediction if isinstance(prediction, str) else "", refs)
            for prediction, refs, row_task in zip(df["predicted_answer"], references, df["task"])
            if str(row_task) == task and refs
        ]
        if scores:
            metrics[task] = round(100 * mean(scores), 2)
    return metrics
