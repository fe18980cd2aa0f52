# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ReClor (metaeval/reclor, split validation): reading-comprehension logic, four numbered options.

Options are numbered from 1; gold = `label` + 1. The answer instruction shows a plain "\\boxed{}" (the fork's
prompt showed "\\boxed{{}}", a doubled-brace literal)."""

from reason.answers import extract_label
from reason.benchmarks import Benchmark, correct
from reason.benchmarks.prompts import numbered


def format_prompt(row: dict) -> str:
    return (
        "Read the context and answer the question by choosing one of the options.\n"
        f"Context:\n{str(row['context']).strip()}\n"
        f"Question:\n{str(row['question']).strip()}\n"
        f"Options:\n{numbered(row['answers'])}\n"
        'Reason step by step, then put the number of the correct option within "\\boxed{}".'
    )


def gold_answer(row: dict) -> str:
    index = int(row["label"])
    if not 0 <= index < len(row["answers"]):
        raise ValueError(f"label {index} is outside the {len(row['answers'])} options.")
    return str(index + 1)


BENCHMARK = Benchmark(
    name="reclor",
    hub_id="metaeval/reclor",
    subset=None,
    split="validation",
    columns=("context", "question", "answers", "label"),
    format_prompt=format_prompt,
    gold_answer=gold_answer,
    extract=lambda response: extract_label(response, ("1", "2", "3", "4", "5", "6")),
    score=lambda extracted, gold: correct(extracted == gold),
)
