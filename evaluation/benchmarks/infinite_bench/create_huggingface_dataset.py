# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Build the InfiniteBench evaluation dataset (https://arxiv.org/abs/2402.13718) in the harness's columns.

The one idea: each task's prompt is split into a context part (the task instruction and the very long input, to be
compressed) and a question part (the query, and the options of multiple-choice tasks), with an answer prefix that
steers the answer into the form the task's scorer parses. Choice answers become `[option text, letter]`.
`max_new_tokens` is the official generation length plus 20.

    python evaluation/benchmarks/infinite_bench/create_huggingface_dataset.py --task passkey --output passkey.parquet
"""

from __future__ import annotations

from typing import Optional

import pandas as pd

SOURCE = "xinrongzhang2022/InfiniteBench"
OFFICIAL_MAX_NEW_TOKENS = {
    "passkey": 6,
    "number_string": 12,
    "kv_retrieval": 50,
    "longbook_sum_eng": 1200,
    "longbook_choice_eng": 40,
    "longbook_qa_eng": 40,
    "longbook_qa_chn": 40,
    "longdialogue_qa_eng": 40,
    "math_find": 3,
    "math_calc": 30000,
    "code_run": 5,
    "code_debug": 5,
}
CONTEXT_TEMPLATES = {
    "passkey": "There is important information hidden in the following text. Find it and memorize it.\n\n{context}",
    "number_string": "There is an important number hidden in the following text. Find it and memorize it.\n\n{context}",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}",
    "longbook_sum_eng": "Summarize the following book.\n\n{context}",
    "longbook_choice_eng": "Read the following book and answer the question.\n\n{context}",
    "longbook_qa_eng": "Read the following book and answer the question.\n\n{context}",
    "longbook_qa_chn": "\u8bf7\u6839\u636e\u4ee5\u4e0b\u4e66\u7c4d\u56de\u7b54\u95ee\u9898\u3002\n\n{context}",
    "longdialogue_qa_eng": (
        'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$"; '
        "identify that character.\n\n{context}"
    ),
    "math_find": "{context}",
    "math_calc": "Compute the intermediate values of the following expression, one after the other.\n\n{context}",
    "code_run": "Here is a Python program; compute the return value of the function call below.\n\n{context}",
    "code_debug": "One of the functions of the following code has a deliberate error. Find it.\n\n{context}",
}
QUESTION_TEMPLATES = {
    "passkey": "\n\n{input}",
    "number_string": "\n\n{input}",
    "kv_retrieval": "\n\n{input}",
    "longbook_sum_eng": "\n\nSummarize the book above.",
    "longbook_choice_eng": "\n\nQuestion: {input}\n\n{options}\n\nAnswer with the letter of the right option.",
    "longbook_qa_eng": "\n\nQuestion: {input}",
    "longbook_qa_chn": "\n\n\u95ee\u9898\uff1a{input}",
    "longdialogue_qa_eng": "\n\nWhich character is $$MASK$$? Answer with the character's name only.",
    "math_find": "\n\n{input}",
    "math_calc": "\n\n{input}",
    "code_run": "\n\n{input}",
    "code_debug": "\n\nWhich function has the deliberate error?\n\n{options}\n\nAnswer with the letter of the option.",
}
ANSWER_PREFIXES = {
    "passkey": "The pass key is",
    "number_string": "The sequence of digits is",
    "kv_retrieval": "The value associated with the specified key is:",
    "longbook_sum_eng": "Summary:",
    "longbook_choice_eng": "The letter of the correct answer is",
    "longbook_qa_eng": "Answer:",
    "longbook_qa_chn": "\u7b54\u6848\uff1a",
    "longdialogue_qa_eng": "The name that has been replaced with $$MASK$$ is likely",
    "math_find": "The answer is:",
    "math_calc": "The values are:",
    "code_run": "The return value is:",
    "code_debug": "The correct option is:",
}
CHOICE_TASKS = ("longbook_choice_eng", "code_debug")


def _options(record: dict) -> str:
    return "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", record.get("options") or []))


def build_row(record: dict, task: str) -> dict:
    """One harness row from an InfiniteBench record (`context`, `input`, `answer`, `options`)."""
    if task not in OFFICIAL_MAX_NEW_TOKENS:
        raise ValueError(f"Unknown InfiniteBench task {task!r}; tasks: {', '.join(OFFICIAL_MAX_NEW_TOKENS)}.")
    answer = list(record["answer"]) if isinstance(record["answer"], (list, tuple)) else [record["answer"]]
    if task in CHOICE_TASKS:
        options = list(record["options"])
        answer = [str(answer[0]), "ABCD"[options.index(answer[0])]]
    return {
        "context": CONTEXT_TEMPLATES[task].format(context=record["context"]),
        "question": QUESTION_TEMPLATES[task].format(input=record.get("input", ""), options=_options(record)),
        "answer_prefix": ANSWER_PREFIXES[task],
        "answer": [str(value) for value in answer],
        "task": task,
        "max_new_tokens": OFFICIAL_MAX_NEW_TOKENS[task] + 20,
    }


def main(task: str, output: Optional[str] = None, push_to_hub: Optional[str] = None) -> None:
    from datasets import Dataset, load_dataset

    source = load_dataset(SOURCE, split=task)
    df = pd.DataFrame([build_row(record, task) for record in source])
    if output:
        df.to_parquet(output, index=False)
    if push_to_hub:
        Dataset.from_pandas(df).push_to_hub(push_to_hub, data_dir=task, split="test")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
