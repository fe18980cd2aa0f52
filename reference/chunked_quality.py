# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Accuracy of the reference model on the synthetic tasks, chunked prefill against unchunked.

    python reference/chunked_quality.py [--rows 10] [--chunk_sizes 128,256] [--presses knorm,snapkv,streaming_llm]
        [--ratio 0.5] [--output reference/results/chunked_quality.json]

The one idea: the same rows, the same presses and ratio, once prefilled in one forward and once with the pipeline's
`prefill_chunk_size` (the press compressing after each chunk, `kvpress.chunked_prefill`), question-agnostic (the
context is compressed before the question is seen). Prints a table of accuracy per press and chunk size (the mean
over tasks, and per task in the JSON). CPU is fine: the reference model is tiny.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

from harness.reference_model import REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH
from harness.synthetic.tasks import TASK_NAMES, generate_rows
from reference import write_report
from reference.evaluate import accuracy, load_reference, make_pipeline, optional_device

PRESSES = {
    "knorm": lambda ratio: _press("KnormPress", compression_ratio=ratio),
    "snapkv": lambda ratio: _press("SnapKVPress", compression_ratio=ratio),
    "streaming_llm": lambda ratio: _press("StreamingLLMPress", compression_ratio=ratio),
    "expected_attention": lambda ratio: _press("ExpectedAttentionPress", compression_ratio=ratio),
    "tova": lambda ratio: _press("TOVAPress", compression_ratio=ratio),
}


def _press(name: str, **kwargs):
    import kvpress

    return getattr(kvpress, name)(**kwargs)


@torch.no_grad()
def predict(pipe, rows: list[dict], press, chunk_size: Optional[int]) -> list[str]:
    return [
        pipe(
            row["context"],
            question=row["question"],
            answer_prefix=row["answer_prefix"],
            press=press,
            max_new_tokens=int(row["max_new_tokens"]),
            prefill_chunk_size=chunk_size,
        )["answer"]
        for row in rows
    ]


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="Reference-model accuracy, chunked prefill against unchunked.")
    parser.add_argument("--model_dir", default=str(REFERENCE_MODEL_DIR))
    parser.add_argument("--rows", type=int, default=10, help="rows per task")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--context_length", type=int, default=TRAINED_CONTEXT_LENGTH)
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--presses", default="knorm,snapkv,streaming_llm")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--chunk_sizes", type=_ints, default=[128, 256])
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default=None, help="JSON file for the result")
    args = parser.parse_args(argv)
    tasks = [task for task in args.tasks.split(",") if task]
    unknown = sorted(set(tasks) - set(TASK_NAMES))
    if unknown:
        parser.error(f"unknown tasks {unknown}; tasks: {', '.join(TASK_NAMES)}")
    presses = [name for name in args.presses.split(",") if name]
    unknown = sorted(set(presses) - set(PRESSES))
    if unknown:
        parser.error(f"unknown presses {unknown}; presses: {', '.join(PRESSES)}")
    if args.rows < 1:
        parser.error(f"--rows must be at least 1, got {args.rows}")

    model, tokenizer = load_reference(args.model_dir, optional_device(args.device))
    pipe = make_pipeline(model, tokenizer)
    rows = [
        row for task in tasks for row in generate_rows(task, args.rows, args.context_length, tokenizer, seed=args.seed)
    ]
    results: dict = {}
    started = time.perf_counter()
    cells = [("none", None)] + [(name, size) for name in presses for size in [None, *args.chunk_sizes]]
    for name, size in cells:
        press = PRESSES[name](args.ratio) if name != "none" else None
        key = f"{name}@{'unchunked' if size is None else size}"
        results[key] = accuracy(rows, predict(pipe, rows, press, size))
    report = {
        "model_dir": str(args.model_dir),
        "rows_per_task": args.rows,
        "seed": args.seed,
        "context_length": args.context_length,
        "ratio": args.ratio,
        "chunk_sizes": args.chunk_sizes,
        "seconds": round(time.perf_counter() - started, 1),
        "accuracy": results,
    }
    header = ["press"] + ["unchunked"] + [f"chunk {size}" for size in args.chunk_sizes]
    lines = [" | ".join(header)]
    for name in ["none"] + presses:
        cells_text = [name]
        for size in [None, *args.chunk_sizes]:
            key = f"{name}@{'unchunked' if size is None else size}"
            cells_text.append(f"{results[key]['all']:.1f}" if key in results else "-")
        lines.append(" | ".join(cells_text))
    sys.stdout.write("\n".join(lines) + "\n")
    return write_report(args.output, report)


if __name__ == "__main__":
    main()
