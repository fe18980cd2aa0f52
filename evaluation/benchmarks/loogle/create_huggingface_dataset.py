# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Build the LooGLE evaluation dataset (https://arxiv.org/abs/2311.04939) in the harness's columns.

The one idea: each LooGLE document carries several question/answer pairs; the document (with the task's
instruction) becomes one context shared by all of its questions, so it is compressed once and asked many times.
Cloze answers are JSON dicts from mask names to entities; the summarisation task has one empty question.

    python evaluation/benchmarks/loogle/create_huggingface_dataset.py --task shortdep_qa --output loogle_sqa.parquet
"""

from __future__ import annotations

import ast
import json
from typing import Optional

import pandas as pd

SOURCE = "bigainlco/LooGLE"
TASKS = ("shortdep_qa", "longdep_qa", "shortdep_cloze", "longdep_summarization")
CONTEXT_PROMPTS = {
    "shortdep_qa": "Please answer the question based on the long texts below.\n{input}",
    "longdep_qa": "Please answer the question based on the long texts below.\n{input}",
    "shortdep_cloze": (
        "Please fill in the masked entities (<mask-0>, <mask-1>, ...) of the question with entities of the long "
        "texts below, and answer with a JSON dict from each mask to its entity.\n{input}"
    ),
    "longdep_summarization": "Please generate a summary of the long texts below.\n{input}",
}
QUESTION_TEMPLATES = {
    "shortdep_qa": "\nQuestion: {Q}\n",
    "longdep_qa": "\nQuestion: {Q}\n",
    "shortdep_cloze": "\n Question: {Q} What are the masked entities?\n",
    "longdep_summarization": "{Q}\n",
}
ANSWER_PREFIXES = {
    "shortdep_qa": "Answer: ",
    "longdep_qa": "Answer: ",
    "shortdep_cloze": "Answer:",
    "longdep_summarization": "Summarization: ",
}
MAX_NEW_TOKENS = {"shortdep_qa": 300, "longdep_qa": 500, "shortdep_cloze": 50, "longdep_summarization": 500}


def _qa_pairs(value) -> list[dict]:
    if isinstance(value, list):
        return value
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return ast.literal_eval(value)


def build_rows(record: dict, task: str) -> list[dict]:
    """Harness rows of one LooGLE record (`input`, and `qa_pairs` with Q/A, or `output` for summaries)."""
    if task not in TASKS:
        raise ValueError(f"Unknown LooGLE task {task!r}; tasks: {', '.join(TASKS)}.")
    context = CONTEXT_PROMPTS[task].format(input=record["input"])
    if task == "longdep_summarization":
        pairs = [{"Q": "", "A": record.get("output", "")}]
    else:
        pairs = _qa_pairs(record["qa_pairs"])
    rows = []
    for pair in pairs:
        answer = pair["A"]
        if task == "shortdep_cloze" and not isinstance(answer, str):
            answer = json.dumps(answer)
        rows.append(
            {
                "context": context,
                "question": QUESTION_TEMPLATES[task].format(Q=pair["Q"]),
                "answer_prefix": ANSWER_PREFIXES[task],
                "answer": answer,
                "task": task,
                "max_new_tokens": MAX_NEW_TOKENS[task],
            }
        )
    return rows


def main(task: str, output: Optional[str] = None, push_to_hub: Optional[str] = None) -> None:
    from datasets import Dataset, load_dataset

    source = load_dataset(SOURCE, task, split="test")
    df = pd.DataFrame([row for record in source for row in build_rows(record, task)])
    if output:
        df.to_parquet(output, index=False)
    if push_to_hub:
        Dataset.from_pandas(df).push_to_hub(push_to_hub, data_dir=task, split="test")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
