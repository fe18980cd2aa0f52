# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Build the LongBench v2 evaluation dataset (https://arxiv.org/abs/2412.15204) in the harness's columns.

The one idea: the long text becomes the context (wrapped in `<text>` tags) and the multiple-choice question, its
four options and the required answer sentence ("The correct answer is (X)") become the question, so the context can
be compressed before the question is seen (zero-shot, no chain of thought).

    python evaluation/benchmarks/longbenchv2/create_huggingface_dataset.py --output longbench_v2.parquet
"""

from __future__ import annotations

from typing import Optional

import pandas as pd

SOURCE = "THUDM/LongBench-v2"
CONTEXT_TEMPLATE = "Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
QUESTION_TEMPLATE = (
    "What is the correct answer to this question: {question}\n"
    "Choices:\n(A) {choice_A}\n(B) {choice_B}\n(C) {choice_C}\n(D) {choice_D}\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
MAX_NEW_TOKENS = 16


def build_row(record: dict) -> dict:
    """One harness row from one LongBench v2 record (context, question, choice_A..D, answer, difficulty, length)."""
    parts = {key: record[key] for key in ("question", "choice_A", "choice_B", "choice_C", "choice_D")}
    return {
        "context": CONTEXT_TEMPLATE.format(context=record["context"]),
        "question": QUESTION_TEMPLATE.format(**parts),
        "answer_prefix": "",
        "answer": record["answer"],
        "difficulty": record.get("difficulty"),
        "length": record.get("length"),
        "domain": record.get("domain"),
        "max_new_tokens": MAX_NEW_TOKENS,
    }


def main(output: Optional[str] = None, push_to_hub: Optional[str] = None, data_dir: str = "0shot") -> None:
    from datasets import Dataset, load_dataset

    source = load_dataset(SOURCE, split="train")
    df = pd.DataFrame([build_row(record) for record in source])
    if output:
        df.to_parquet(output, index=False)
    if push_to_hub:
        Dataset.from_pandas(df).push_to_hub(push_to_hub, data_dir=data_dir, split="test")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
