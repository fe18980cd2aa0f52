# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Reading-comprehension logic datasets with numbered options (LogiQA, ReClor): a context, a question, a list of
options shown as "1. text", ..., and a 0-based gold index answered as its 1-based number.

The answer instruction shows a plain "\\boxed{}" (the fork's prompt showed "\\boxed{{}}", a doubled-brace literal)."""

from __future__ import annotations

from reason.answers import extract_label
from reason.benchmarks import Benchmark, correct
from reason.benchmarks.prompts import numbered

# the numbers the extractor accepts: the datasets have four options, and a reply of "5" or "6" still counts as an answer
# (scored wrong) rather than as no answer
OPTION_NUMBERS = ("1", "2", "3", "4", "5", "6")


def numbered_choice_benchmark(name: str, hub_id: str, split: str, question: str, options: str, label: str) -> Benchmark:
    """The Benchmark of a dataset whose rows have a `context` column and the given question, options and 0-based
    gold-index columns; the gold answer is the index + 1 as a string, and an index outside the options raises."""

    def format_prompt(row: dict) -> str:
        return (
            "Read the context and answer the question by choosing one of the options.\n"
            f"Context:\n{str(row['context']).strip()}\n"
            f"Question:\n{str(row[question]).strip()}\n"
            f"Options:\n{numbered(row[options])}\n"
            'Reason step by step, then put the number of the correct option within "\\boxed{}".'
        )

    def gold_answer(row: dict) -> str:
        index = int(row[label])
        if not 0 <= index < len(row[options]):
            raise ValueError(f"{label} {index} is outside the {len(row[options])} options.")
        return str(index + 1)

    return Benchmark(
        name=name,
        hub_id=hub_id,
        subset=None,
        split=split,
        columns=("context", question, options, label),
        format_prompt=format_prompt,
        gold_answer=gold_answer,
        extract=lambda response: extract_label(response, OPTION_NUMBERS),
        score=lambda extracted, gold: correct(extracted == gold),
    )
