# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ReClor (metaeval/reclor, split validation): reading-comprehension logic, four numbered options (`answers`), the
question in `question`, gold = `label` + 1 (the shared prompt and scoring: reason/benchmarks/numbered_choice.py)."""

from reason.benchmarks.numbered_choice import numbered_choice_benchmark

BENCHMARK = numbered_choice_benchmark(
    name="reclor",
    hub_id="metaeval/reclor",
    split="validation",
    question="question",
    options="answers",
    label="label",
)
