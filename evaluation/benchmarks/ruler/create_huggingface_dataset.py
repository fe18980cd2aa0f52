# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Build the RULER evaluation dataset (https://arxiv.org/abs/2404.06654) from RULER's generated jsonl files.

The one idea: RULER writes one prompt per row (`input`) with the expected strings (`outputs`); the harness needs the
prompt split into the context to compress, the question, and the answer prefix. The question starts at the last
match of the task's question sentence and the answer prefix at the first answer cue after it.

Generate the files with RULER's `scripts/data/prepare.py` (base template, 500 samples per task) for one length, then

    python evaluation/benchmarks/ruler/create_huggingface_dataset.py --ruler_dir <dir with {task}/validation.jsonl> \\
        --context_length 4096 --output ruler_4096.parquet [--push_to_hub <org/name>]

and evaluate the file offline with `--dataset ruler --data_path ruler_4096.parquet`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import pandas as pd

# Task family (the task name before the first "_") -> question regex, answer cue regex, max_new_tokens.
QUESTION_PATTERNS = {
    "niah": r"What (?:is|are all) the special magic",
    "vt": r"Question: Find all variables that are assigned the value",
    "cwe": r"Question: What are the 10 most common words in the above list\?",
    "fwe": r"Question: Do not provide any explanation\.",
    "qa": r"Answer the question based on the given documents\.",
}
ANSWER_PATTERNS = {"niah": r"The special magic"}
DEFAULT_ANSWER_PATTERN = r"Answer:"
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)


def task_family(task: str) -> str:
    family = task.split("_")[0]
    if family not in QUESTION_PATTERNS:
        raise ValueError(f"Unknown RULER task {task!r}; task names start with one of {sorted(QUESTION_PATTERNS)}.")
    return family


def split_prompt(prompt: str, task: str) -> tuple[str, str, str]:
    """`(context, question, answer_prefix)` of one RULER prompt."""
    family = task_family(task)
    matches = list(re.finditer(QUESTION_PATTERNS[family], prompt))
    if not matches:
        raise ValueError(f"The {task} prompt has no question matching {QUESTION_PATTERNS[family]!r}.")
    start = matches[-1].start()
    context, rest = prompt[:start], prompt[start:]
    answer = re.search(ANSWER_PATTERNS.get(family, DEFAULT_ANSWER_PATTERN), rest)
    if answer is None:
        raise ValueError(f"The {task} prompt has no answer cue after its question.")
    return context, rest[: answer.start()], rest[answer.start() :]


def get_dataframe(path: str | Path, task: Optional[str] = None) -> pd.DataFrame:
    """Rows of one RULER jsonl file (task: the file's folder for `validation.jsonl`, else its stem)."""
    path = Path(path)
    task = task or (path.parent.name if path.stem == "validation" else path.stem)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            context, question, answer_prefix = split_prompt(record["input"], task)
            rows.append(
                {
                    "context": context,
                    "question": question,
                    "answer_prefix": answer_prefix,
                    "answer": list(record["outputs"]),
                    "task": task,
                    "max_new_tokens": MAX_NEW_TOKENS[task_family(task)],
                }
            )
    return pd.DataFrame(rows)


def main(
    ruler_dir: str,
    context_length: int,
    output: Optional[str] = None,
    push_to_hub: Optional[str] = None,
    tasks: tuple = TASKS,
) -> None:
    """Collect `{ruler_dir}/{task}/validation.jsonl` for every task into one parquet file and/or a Hub dataset."""
    frames = []
    for task in tasks:
        path = Path(ruler_dir) / task / "validation.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; generate the RULER data for task {task} first.")
        frames.append(get_dataframe(path, task))
    df = pd.concat(frames, ignore_index=True)
    if output:
        df.to_parquet(output, index=False)
    if push_to_hub:
        from datasets import Dataset

        Dataset.from_pandas(df).push_to_hub(push_to_hub, data_dir=str(context_length), split="test")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
