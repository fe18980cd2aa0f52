# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Write synthetic task rows (RULER-style, https://arxiv.org/abs/2404.06654) to a jsonl or parquet file.

The one idea: the rows are a pure function of (tasks, lengths, seed, tokenizer), so a file written here can be
regenerated anywhere, offline. Examples:

    python evaluation/benchmarks/synthetic/create_dataset.py --output rows.jsonl --tasks all --context_lengths 1024
    python evaluation/benchmarks/synthetic/create_dataset.py --output sweep.parquet --sweep \\
        --context_lengths 1024,2048,4096 --depths 0.05,0.5,0.95 --tokenizer /path/to/model
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from harness.synthetic.tasks import TASK_NAMES, generate_rows, needle_sweep_rows

logger = logging.getLogger("evaluation.benchmarks.synthetic.create_dataset")


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _tasks(text: str) -> list[str]:
    names = list(TASK_NAMES) if text == "all" else [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in TASK_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown}; choose among {', '.join(TASK_NAMES)} or 'all'")
    return names


def build_rows(args: argparse.Namespace) -> list[dict]:
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.sweep:
        return needle_sweep_rows(
            args.context_lengths, depths=args.depths, num_samples=args.num_samples, tokenizer=tokenizer, seed=args.seed
        )
    rows = []
    for length in args.context_lengths:
        for task in args.tasks:
            for row in generate_rows(task, args.num_samples, length, tokenizer=tokenizer, seed=args.seed):
                row["context_length"] = length
                rows.append(row)
    return rows


def write_rows(rows: list[dict], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".jsonl":
        with output.open("w") as file:
            for row in rows:
                file.write(json.dumps(row) + "\n")
    elif output.suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(output)
    else:
        raise ValueError(f"--output must end with .jsonl or .parquet, got {output}.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="a .jsonl or .parquet file")
    parser.add_argument("--tasks", type=_tasks, default=list(TASK_NAMES), help="comma-separated task names or 'all'")
    parser.add_argument("--context_lengths", type=_int_list, default=[1024], help="comma-separated token counts")
    parser.add_argument("--num_samples", type=int, default=20, help="rows per task and length (per depth: --sweep)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or Hub id (default: the reference model's)")
    parser.add_argument("--sweep", action="store_true", help="the needle-in-a-haystack sweep instead of the tasks")
    parser.add_argument("--depths", type=_float_list, default=[0.05, 0.5, 0.95], help="sweep depths (fractions)")
    args = parser.parse_args(argv)
    if args.output.suffix not in (".jsonl", ".parquet"):
        parser.error(f"--output must end with .jsonl or .parquet, got {args.output}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = build_rows(args)
    write_rows(rows, args.output)
    logger.info("wrote %d rows to %s", len(rows), args.output)


if __name__ == "__main__":
    main()
