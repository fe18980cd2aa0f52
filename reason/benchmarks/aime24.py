# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""AIME 2024 (math-ai/aime24, split test): integer answers 0-999.

Gold: the `answer` column when the data has one, else the boxed answer inside `solution` (the fork compared the
extracted answer with the whole `solution` text, "\\boxed{204}", which can never match)."""

from reason.answers import extract_answer, last_boxed, math_equal
from reason.benchmarks import Benchmark, correct
from reason.benchmarks.prompts import step_by_step


def gold_answer(row: dict) -> str:
    if row.get("answer") is not None and str(row["answer"]).strip():
        return str(row["answer"]).strip()
    solution = str(row.get("solution", ""))
    boxed = last_boxed(solution)
    if boxed is not None:
        return boxed
    if solution.strip().isdigit():
        return solution.strip()
    raise ValueError(f'an AIME24 row needs an "answer" or a "solution" with a \\boxed answer, got {solution[-80:]!r}.')


BENCHMARK = Benchmark(
    name="aime24",
    hub_id="math-ai/aime24",
    subset=None,
    split="test",
    columns=("problem", "solution"),
    format_prompt=lambda row: step_by_step(row["problem"]),
    gold_answer=gold_answer,
    extract=extract_answer,
    score=lambda extracted, gold: correct(math_equal(extracted, gold)),
)
