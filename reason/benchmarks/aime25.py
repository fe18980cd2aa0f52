# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""AIME 2025 (math-ai/aime25, split test): integer answers 0-999.

Gold: the `answer` column. Scored with `math_equal` (numbers by value, LaTeX after normalisation: `\\dfrac{1}{2}`
equals `0.5`); the fork compared raw strings."""

from reason.benchmarks.math_problems import math_benchmark

BENCHMARK = math_benchmark("aime25", "math-ai/aime25")
