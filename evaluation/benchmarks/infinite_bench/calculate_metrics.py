# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""InfiniteBench metrics (https://arxiv.org/abs/2402.13718): one scorer per task, mean over rows.

The one idea: each task's answer has a known form (a key, a number, a function name or option letter, a list of
numbers, free text), and the scorer pulls that form out of the generation: exact retrieval for the synthetic tasks,
first number for passkey/number_string/math_find, option parsing for the multiple-choice tasks, prefix accuracy for
math_calc, token F1 for the book QA tasks and ROUGE-L for book summaries.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import pandas as pd

from evaluation.benchmarks.text_normalization import as_list, qa_f1, qa_f1_zh_chars

OPTION_LETTERS = "ABCD"


def _replace(text: str, characters: Sequence[str], by: str = " ") -> str:
    for character in characters:
        text = text.replace(character, by)
    return text


def _collapse_spaces(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def _first(label):
    return as_list(label)[0]


def score_kv_retrieval(prediction: str, label) -> bool:
    """The key's value appears as a whole word once punctuation is turned into spaces."""
    words = _replace(prediction, ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]).split()
    return str(_first(label)) in words


def _first_integer(text: str) -> str:
    numbers = re.findall(r"\d+", text)
    return numbers[0] if numbers else ""


def score_passkey(prediction: str, label) -> bool:
    """The first integer of the prediction is the passkey."""
    return str(_first(label)) == _first_integer(prediction)


def score_code_run(prediction: str, label) -> bool:
    """The last word of the prediction (punctuation removed) is the program's integer output."""
    words = _replace(prediction.strip(), ["\n", ".", "`", "'", '"', ":"]).split()
    if not words:
        return False
    try:
        return int(words[-1]) == int(str(_first(label)).strip())
    except ValueError:
        return False


def _option_and_text(label) -> tuple[list[str], list[str]]:
    """Split a choice label into its option letters and its option texts (e.g. `["my_func", "B"]`)."""
    values = [str(value).strip() for value in as_list(label)]
    letters = [value for value in values if len(value) == 1 and value in OPTION_LETTERS]
    texts = [value for value in values if value not in letters]
    return letters, texts


def score_code_debug(prediction: str, label) -> bool:
    """The answer is the buggy function's option letter or its name, read at the start or after an answer prefix."""
    letters, names = _option_and_text(label)
    prediction = prediction.strip()
    if any(prediction[:2] in (f"{letter}.", f"{letter}:") for letter in letters):
        return True
    prediction = _replace(prediction, ["\n", "`", "'", '"', "-", "*", "Option", "option"])
    prediction = _collapse_spaces(prediction)
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        position = prediction.find(prefix)
        if position == -1:
            continue
        if len(prediction) < position + len(prefix) + 1:
            return False
        after = prediction[position + len(prefix) + 1 :]
        return any(after.startswith(candidate) for candidate in letters + names)
    return False


def score_math_find(prediction: str, label) -> bool:
    """The first number of the prediction equals the expected number (integer or float)."""
    expected = _first(label)
    match = re.search(r"\d+\.\d+|\d+", prediction)
    if match is None:
        return False
    try:
        return float(match.group(0)) == float(str(expected).strip())
    except ValueError:
        return False


def score_longdialogue_qa_eng(prediction: str, label) -> bool:
    """The speaker's name appears, in capitals, as a whole word."""
    words = _replace(prediction.strip(), ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]).split()
    return str(_first(label)).upper() in [word.upper() for word in words]


def score_longbook_qa_eng(prediction: str, label) -> float:
    """Token F1 (SQuAD normalisation), best over references."""
    return max(qa_f1(prediction, str(reference)) for reference in as_list(label))


def score_longbook_qa_chn(prediction: str, label) -> float:
    """Character F1 after Chinese normalisation, best over references."""
    return max(qa_f1_zh_chars(prediction, str(reference)) for reference in as_list(label))


def score_longbook_choice_eng(prediction: str, label) -> bool:
    """The chosen option: a leading letter, the option text, a letter after an answer prefix, or the first
    stand-alone letter A-D."""
    accepted = [str(value).strip() for value in as_list(label)]
    prediction = prediction.strip()
    if prediction == "":
        return False
    if prediction[0] in OPTION_LETTERS:
        return prediction[0] in accepted
    if prediction in accepted:
        return True
    prediction = _collapse_spaces(_replace(prediction, ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]))
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        position = prediction.find(prefix)
        if position == -1:
            continue
        if len(prediction) < position + len(prefix) + 1:
            return False
        after = prediction[position + len(prefix) + 1 :]
        return any(after.startswith(candidate) for candidate in accepted)
    for word in prediction.split():
        if len(word) == 1 and word in OPTION_LETTERS:
            return word in accepted
    return False


def score_longbook_sum_eng(prediction: str, label) -> float:
    """ROUGE-L F1 against the reference summary (best over references)."""
    from rouge import Rouge

    scores = []
    for reference in as_list(label):
        try:
            scores.append(float(Rouge().get_scores([prediction], [str(reference)])[0]["rouge-l"]["f"]))
        except (ValueError, RecursionError):
            scores.append(0.0)
    return max(scores)


def score_math_calc(prediction: str, label) -> float:
    """Fraction of the expected values that the prediction's numbers reproduce, in order, before the first error."""
    expected = [int(str(value).strip()) for value in as_list(label)]
    predicted = [int(number) for number in re.split(r"[^0-9]", prediction.strip()) if number != ""]
    correct = 0
    for position, value in enumerate(expected):
        if position >= len(predicted) or predicted[position] != value:
            break
        correct += 1
    return correct / len(expected) if expected else 0.0


TASK_TO_SCORER: dict[str, Callable[[str, object], float | bool]] = {
    "kv_retrieval": score_kv_retrieval,
    "kv_retrieval_prefix": score_kv_retrieval,
    "kv_retrieval_both": score_kv_retrieval,
    "passkey": score_passkey,
    "number_string": score_passkey,
    "code_run": score_code_run,
    "code_debug": score_code_debug,
    "math_find": score_math_find,
    "math_calc": score_math_calc,
    "longdialogue_qa_eng": score_longdialogue_qa_eng,
    "longbook_qa_eng": score_longbook_qa_eng,
    "longbook_qa_chn": score_longbook_qa_chn,
    "longbook_choice_eng": score_longbook_choice_eng,
    "longbook_sum_eng": score_longbook_sum_eng,
}


def get_score_one(prediction, label, task: str) -> float:
    """Score of one prediction in [0, 1]."""
    if task not in TASK_TO_SCORER:
        raise ValueError(f"Unknown InfiniteBench task {task!r}; known tasks: {sorted(TASK_TO_SCORER)}.")
    prediction = prediction if isinstance(prediction, str) else ""
    return float(TASK_TO_SCORER[task](prediction, label))


def get_score(labels: Sequence, preds: Sequence, task: str) -> float:
    """Mean score of `preds` against `labels` for one task."""
    scores = [get_score_one(pred, label, task) for pred, label in zip(preds, labels)]
    return sum(scores) / len(scores) if scores else 0.0


def calculate_metrics(df: pd.DataFrame) -> float | dict:
    """The task's mean score (a float, as upstream) for one task; `{task: score, "average": mean}` for several."""
    tasks = sorted(str(task) for task in df["task"].unique())
    if len(tasks) == 1:
        return get_score(list(df["answer"]), list(df["predicted_answer"]), tasks[0])
    scores = {}
    for task in tasks:
        rows = df[df["task"] == task]
        scores[task] = get_score(list(rows["answer"]), list(rows["predicted_answer"]), task)
    scores["average"] = sum(scores.values()) / len(tasks)
    return scores
