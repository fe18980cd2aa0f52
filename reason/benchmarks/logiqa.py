# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""LogiQA (lucasmccabe/logiqa, split test): logical reasoning, four numbered options (`options`), the question in
`query`, gold = `correct_option` + 1 (the shared prompt and scoring: reason/benchmarks/numbered_choice.py)."""

from reason.benchmarks.numbered_choice import numbered_choice_benchmark

BENCHMARK = numbered_choice_benchmark(
    name="logiqa",
    hub_id="lucasmccabe/logiqa",
    split="test",
    question="query",
    options="options",
    label="correct_option",
)
