# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""FOLIO (yale-nlp/folio, split validation): first-order logic; is the conclusion True, False or Uncertain?"""

from reason.answers import extract_boolean
from reason.benchmarks import Benchmark, correct

LABELS = ("true", "false", "uncertain")


def format_prompt(row: dict) -> str:
    return (
        "Given the premises and the conclusion below, determine whether the conclusion is True, False or Uncertain "
        "given the premises.\n"
        f"Premises:\n{str(row['premises']).strip()}\n"
        f"Conclusion:\n{str(row['conclusion']).strip()}\n"
        'Reason step by step, then answer with True, False or Uncertain within "\\boxed{}".'
    )


def gold_answer(row: dict) -> str:
    label = str(row["label"]).strip().lower()
    if label not in LABELS:
        raise ValueError(f"a FOLIO label must be True, False or Uncertain, got {row['label']!r}.")
    return label


BENCHMARK = Benchmark(
    name="folio",
    hub_id="yale-nlp/folio",
    subset=None,
    split="validation",
    columns=("premises", "conclusion", "label"),
    format_prompt=format_prompt,
    gold_answer=gold_answer,
    extract=lambda response: extract_boolean(response, LABELS),
    score=lambda extracted, gold: correct(extracted == gold),
)
