# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""CommonsenseQA (tau/commonsense_qa, split validation): commonsense, choices A-E."""

from reason.answers import extract_label
from reason.benchmarks import Benchmark, correct
from reason.benchmarks.prompts import choices_of, lettered


def format_prompt(row: dict) -> str:
    labels, texts = choices_of(row)
    return (
        f"Question:\n{str(row['question']).strip()}\n"
        f"Choices:\n{lettered(labels, texts)}\n"
        'Reason step by step, then put the letter of the correct choice within "\\boxed{}".'
    )


def extract(response: str) -> str:
    return extract_label(response, ("A", "B", "C", "D", "E"))


BENCHMARK = Benchmark(
    name="commonsenseqa",
    hub_id="tau/commonsense_qa",
    subset=None,
    split="validation",
    columns=("question", "choices", "answerKey"),
    format_prompt=format_prompt,
    gold_answer=lambda row: str(row["answerKey"]).strip().upper(),
    extract=extract,
    score=lambda extracted, gold: correct(extracted.upper() == gold),
)
