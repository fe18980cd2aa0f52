# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""GSM8K (openai/gsm8k, subset main, split test): grade-school word problems with a numeric answer.

Gold: the number after the last "####" of `answer`. Scored as numbers (the fork compared strings, so "1,000" and
"1000", or "42.0" and "42", differed)."""

from reason.benchmarks.math_problems import math_benchmark


def gold_answer(row: dict) -> str:
    answer = str(row["answer"])
    if "####" not in answer:
        raise ValueError(f'a GSM8K "answer" must end with "#### <number>", got {answer[-80:]!r}.')
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


BENCHMARK = math_benchmark(
    "gsm8k", "openai/gsm8k", columns=("question", "answer"), gold_answer=gold_answer, subset="main"
)
