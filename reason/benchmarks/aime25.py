# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""AIME 2025 (math-ai/aime25, split test): integer answers 0-999.

Gold: the `answer` column. Scored with `math_equal` (numbers by value, LaTeX after normalisation: `\\dfrac{1}{2}`
equals `0.5`); the fork compared raw strings."""

from reason.answers import extract_answer, math_equal
from reason.benchmarks import Benchmark, correct
from reason.benchmarks.prompts import step_by_step

BENCHMARK = Benchmark(
    name="aime25",
    hub_id="math-ai/aime25",
    subset=None,
    split="test",
    columns=("problem", "answer"),
    format_prompt=lambda row: step_by_step(row["problem"]),
    gold_answer=lambda row: str(row["answer"]).strip(),
    extract=extract_answer,
    score=lambda extracted, gold: correct(math_equal(extracted, gold)),
)
