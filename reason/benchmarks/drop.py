# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""DROP (ucinlp/drop, split validation): discrete reasoning over paragraphs; answers are one or more spans.

Gold: the list `answers_spans["spans"]`. Scored by exact match (`correct`) and F1 over the spans (DROP's bag
alignment); the fork compared the prediction with single characters of the gold list's repr."""

from reason.answers import drop_scores, extract_answer
from reason.benchmarks import Benchmark
from reason.benchmarks.prompts import step_by_step


def gold_answer(row: dict) -> list:
    spans = row["answers_spans"]
    if isinstance(spans, dict):
        spans = spans.get("spans")
    if not isinstance(spans, (list, tuple)) or not spans:
        raise ValueError(
            f'a DROP row needs answers_spans = {{"spans": [...]}} with a span, got {row["answers_spans"]!r}.'
        )
    return [str(span) for span in spans]


def format_prompt(row: dict) -> str:
    return step_by_step(f"Passage:\n{str(row['passage']).strip()}\nQuestion:\n{str(row['question']).strip()}")


def score(extracted: str, gold: list) -> dict:
    scores = drop_scores(extracted, gold)
    return {"correct": scores["exact_match"], "f1": scores["f1"]}


BENCHMARK = Benchmark(
    name="drop",
    hub_id="ucinlp/drop",
    subset=None,
    split="validation",
    columns=("passage", "question", "answers_spans"),
    format_prompt=format_prompt,
    gold_answer=gold_answer,
    extract=extract_answer,
    score=score,
)
