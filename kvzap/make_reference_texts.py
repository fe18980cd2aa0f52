# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Write `kvzap/reference_texts.txt`: the shipped documents for training a KVzap surrogate of the reference model.

    python kvzap/make_reference_texts.py [--per_task 5] [--output kvzap/reference_texts.txt]

The one idea: the reference model knows only the synthetic tasks' text, so its surrogate is trained on contexts of
those tasks (`evaluation/benchmarks/synthetic/tasks.py`), generated with a seed no evaluation uses, of 760 to 1000
tokens (upstream's documents have 750 to 1250 tokens). Documents are separated by blank lines (none of the
contexts has one).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from kvzap.shared import REFERENCE_MODEL_DIR, SYNTHETIC_TASK_NAMES, generate_synthetic_rows

SEED = 240_601  # generate_rows seeds the rows "eval|<seed>|...": no test or quality table uses this one
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "reference_texts.txt"


def reference_texts(per_task: int = 5, seed: int = SEED, min_length: int = 760, max_length: int = 1000) -> list[str]:
    """`per_task` contexts of every synthetic task, interleaved (task after task), of lengths drawn in
    [min_length, max_length] tokens of the reference tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(REFERENCE_MODEL_DIR))
    rng = random.Random(seed)
    texts = []
    for index in range(per_task):
        for task in SYNTHETIC_TASK_NAMES:
            length = rng.randint(min_length, max_length)
            row = generate_synthetic_rows(task, 1, length, tokenizer, seed=seed + index)[0]
            texts.append(row["context"].strip())
    return texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per_task", type=int, default=5)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.per_task < 1:
        parser.error(f"--per_task must be at least 1, got {args.per_task}")
    texts = reference_texts(args.per_task)
    if any("\n\n" in text for text in texts):
        raise ValueError("a synthetic context holds a blank line, which would split it into two documents")
    args.output.write_text("\n\n".join(texts) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
