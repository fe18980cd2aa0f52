# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""LogiQA (lucasmccabe/logiqa, split test): logical reasoning, four numbered options.

Options are numbered from 1; gold = `correct_option` + 1. The answer instruction shows a plain "\\boxed{}" (the fork's
prompt showed "\\boxed{{}}", a doubled-brace literal)."""

from reason.answers import extract_label
from reason.benchmarks import Benchmark, correct
from reason.benchmarks.prompts import numbered


def format_prompt(row: dict) -> str:
    return (
        "Read the context and answer the question by choosing one of the options.\n"
        f"Context:\n{str(row['context']).strip()}\n"
        f"Question:\n{str(row['query']).strip()}\n"
        f"Options:\n{numbered(row['options'])}\n"
        'Reason step by step, then put the number of the correct option within "\\boxed{}".'
    )


def gold_answer(row: dict) -> str:
    index = int(row["correct_option"])
    if not 0 <= index < len(row["options"]):
        raise ValueError(f"correct_option {index} is outside the {len(row['options'])} options.")
    return str(index + 1)


BENCHMARK = Benchmark(
    name="logiqa",
    hub_id="lucasmccabe/logiqa",
    subset=None,
    split="test",
    columns=("context", "query", "options", "correct_option"),
    format_prompt=format_prompt,
    gold_answer=gold_answer,
    extract=lambda response: extract_label(response, ("1", "2", "3", "4", "5", "6")),
    score=lambda extracted, gold: correct(extracted == gold),
)
