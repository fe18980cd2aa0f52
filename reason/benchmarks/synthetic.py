# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The offline default: a synthetic variable-tracking task the shipped reference model solves (no download).

A row is a chain of assignments ("VAR A = 12345." ... "VAR B = VAR A.") hidden in filler text, from
`evaluation/benchmarks/synthetic/tasks.py`; the question asks for every variable that ends up holding the value, so
the model must follow the chain. The prompt is the reference model's format (context, question, answer prefix:
no chat template); the response is correct when it names every such variable."""

from reason.benchmarks import Benchmark, correct
from reason.shared import synthetic_rows

TASK = "variable_tracking"
CONTEXT_LENGTH = 512  # tokens of the context (the reference model answers it; half its trained length)


def make_rows(num_samples: int, seed: int, tokenizer=None) -> list:
    return synthetic_rows(TASK, num_samples, CONTEXT_LENGTH, tokenizer=tokenizer, seed=seed)


def format_prompt(row: dict) -> str:
    return f"{row['context']}{row['question']}\n{row['answer_prefix']}"


def score(extracted: str, gold: list) -> dict:
    words = set(extracted.replace(",", " ").replace(".", " ").split())
    return correct(all(str(answer) in words for answer in gold))


BENCHMARK = Benchmark(
    name="synthetic",
    hub_id=None,
    subset=None,
    split="test",
    columns=("context", "question", "answer_prefix", "answer"),
    format_prompt=format_prompt,
    gold_answer=lambda row: [str(answer) for answer in row["answer"]],
    extract=lambda response: response.strip(),
    score=score,
    make_rows=make_rows,
)
