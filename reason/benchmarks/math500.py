# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""MATH-500 (HuggingFaceH4/MATH-500, split test): competition problems with LaTeX answers.

Gold: the `answer` column. Scored with `math_equal` (numbers by value, LaTeX after normalisation: `\\dfrac{1}{2}`
equals `0.5`); the fork compared raw strings."""

from reason.benchmarks.math_problems import math_benchmark

BENCHMARK = math_benchmark("math500", "HuggingFaceH4/MATH-500")
