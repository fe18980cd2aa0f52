# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""OpenBookQA (allenai/openbookqa, subset main, split test): elementary science, choices A-D."""

from reason.benchmarks.lettered_choice import lettered_choice_benchmark

BENCHMARK = lettered_choice_benchmark("openbookqa", "allenai/openbookqa", "main", "test", "question_stem")
