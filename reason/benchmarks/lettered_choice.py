# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Multiple-choice datasets with lettered choices (CommonsenseQA, OpenBookQA): a question, a `choices` column of
labels and texts shown as "A. text", ..., and the gold letter in `answerKey`."""

from __future__ import annotations

from typing import Optional

from reason.answers import extract_label
from reason.benchmarks import Benchmark, correct
from reason.benchmarks.prompts import choices_of, lettered

# the letters the extractor accepts (OpenBookQA has four choices; a reply "E" still counts as an answer, scored wrong)
CHOICE_LETTERS = ("A", "B", "C", "D", "E")


def lettered_choice_benchmark(name: str, hub_id: str, subset: Optional[str], split: str, question: str) -> Benchmark:
    """The Benchmark of a dataset whose rows have the given question column, `choices` and `answerKey`."""

    def format_prompt(row: dict) -> str:
        labels, texts = choices_of(row)
        return (
            f"Question:\n{str(row[question]).strip()}\n"
            f"Choices:\n{lettered(labels, texts)}\n"
            'Reason step by step, then put the letter of the correct choice within "\\boxed{}".'
        )

    return Benchmark(
        name=name,
        hub_id=hub_id,
        subset=subset,
        split=split,
        columns=(question, "choices", "answerKey"),
        format_prompt=format_prompt,
        gold_answer=lambda row: str(row["answerKey"]).strip().upper(),
        extract=lambda response: extract_label(response, CHOICE_LETTERS),
        score=lambda extracted, gold: correct(extracted.upper() == gold),
    )
