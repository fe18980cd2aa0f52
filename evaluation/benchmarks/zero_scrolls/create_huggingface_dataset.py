# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Build the ZeroSCROLLS evaluation dataset (https://arxiv.org/abs/2305.14196) in the harness's columns.

The one idea: every ZeroSCROLLS prompt marks where its document and its query end, so the prompt is cut into the
context to compress (instruction + document), the question (the query) and the answer prefix (the response header).
Test answers are private (empty here); the validation split keeps them, so it can be scored locally.

    python evaluation/benchmarks/zero_scrolls/create_huggingface_dataset.py --output zero_scrolls.parquet
"""

from __future__ import annotations

from typing import Optional

import pandas as pd

SOURCE = "tau/zero_scrolls"
MAX_NEW_TOKENS = {
    "gov_report": 1024,
    "summ_screen_fd": 512,
    "qmsum": 512,
    "qasper": 128,
    "narrative_qa": 64,
    "quality": 10,
    "musique": 32,
    "squality": 512,
    "space_digest": 36,
    "book_sum_sort": 256,
}


def build_row(record: dict, task: str, with_answer: bool) -> dict:
    """One harness row from a ZeroSCROLLS record (`input`, `document_end_index`, `query_end_index`, `output`)."""
    text, document_end, query_end = record["input"], record["document_end_index"], record["query_end_index"]
    return {
        "context": text[:document_end],
        "question": text[document_end:query_end],
        "answer_prefix": text[query_end:].strip(),
        "answer": (record.get("output") or "") if with_answer else "",
        "task": task,
        "max_new_tokens": MAX_NEW_TOKENS[task],
    }


def main(split: str = "test", output: Optional[str] = None, push_to_hub: Optional[str] = None) -> None:
    """All tasks of one split ("test": answers private, "validation": answers kept)."""
    from datasets import Dataset, load_dataset

    rows = []
    for task in MAX_NEW_TOKENS:
        for record in load_dataset(SOURCE, task, split=split):
            rows.append(build_row(record, task, with_answer=split != "test"))
    df = pd.DataFrame(rows)
    if output:
        df.to_parquet(output, index=False)
    if push_to_hub:
        Dataset.from_pandas(df).push_to_hub(push_to_hub, split="test")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
