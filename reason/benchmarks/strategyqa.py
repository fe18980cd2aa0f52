# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""StrategyQA (ChilleD/StrategyQA, split test): yes/no questions that need implicit multi-step reasoning.

The prompt lists the `facts` one per line (the fork wrote the literal characters "\\F" and "\\Q" and the Python
repr of the facts)."""

from reason.answers import extract_boolean
from reason.benchmarks import Benchmark, correct

LABELS = ("true", "false")


def _facts(value) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(str(fact).strip() for fact in value)
    return str(value).strip()


def format_prompt(row: dict) -> str:
    return (
        "Use the facts below to answer the question with true or false.\n"
        f"Facts:\n{_facts(row['facts'])}\n"
        f"Question:\n{str(row['question']).strip()}\n"
        'Reason step by step, then put true or false within "\\boxed{}".'
    )


def gold_answer(row: dict) -> str:
    answer = row["answer"]
    if isinstance(answer, bool):
        return "true" if answer else "false"
    text = str(answer).strip().lower()
    if text not in LABELS:
        raise ValueError(f"a StrategyQA answer must be true or false, got {answer!r}.")
    return text


BENCHMARK = Benchmark(
    name="strategyqa",
    hub_id="ChilleD/StrategyQA",
    subset=None,
    split="test",
    columns=("question", "facts", "answer"),
    format_prompt=format_prompt,
    gold_answer=gold_answer,
    extract=lambda response: extract_boolean(response, LABELS),
    score=lambda extracted, gold: correct(extracted == gold),
)
