# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""AIME 2024 (math-ai/aime24, split test): integer answers 0-999.

Gold: the `answer` column when the data has one, else the boxed answer inside `solution` (the fork compared the
extracted answer with the whole `solution` text, "\\boxed{204}", which can never match)."""

from reason.answers import last_boxed
from reason.benchmarks.math_problems import math_benchmark


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


BENCHMARK = math_benchmark("aime24", "math-ai/aime24", columns=("problem", "solution"), gold_answer=gold_answer)
