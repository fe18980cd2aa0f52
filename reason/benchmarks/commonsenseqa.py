# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""CommonsenseQA (tau/commonsense_qa, split validation): commonsense, choices A-E."""

from reason.benchmarks.lettered_choice import lettered_choice_benchmark

BENCHMARK = lettered_choice_benchmark("commonsenseqa", "tau/commonsense_qa", None, "validation", "question")
