# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Accuracy of a trained KVzap surrogate on the reference model's synthetic tasks, against baselines at the same
achieved compression.

    python kvzap/compare_reference.py --kvzap_model_path out --thresholds=-6.5,-6,-5.5 --rows_per_task 3 \\
        --output kvzap/results/compare_reference.json

The one idea: `DMSPress(KVzapPress(trained), threshold)` decides how much it evicts, so each threshold is run first
and its achieved compression ratio (masked fraction of the context's cache entries, averaged over rows) is measured;
`RandomPress`, `KnormPress` and `KVzipPress` (the KVzip+ target the surrogate approximates, with
`kvzip_plus_normalization=True`) are then run at that ratio. All rows go through the kvpress pipeline,
question-agnostic (the context is compressed before the question is seen). Every cell is written to the JSON file
when it is done, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from kvpress.presses.dms_press import DMSPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.kvzap_press import KVzapPress
from kvpress.presses.kvzip_press import KVzipPress
from kvpress.presses.random_press import RandomPress
from kvzap.shared import (
    REFERENCE_MODEL_DIR,
    SYNTHETIC_TASK_NAMES,
    TRAINED_CONTEXT_LENGTH,
    generate_synthetic_rows,
    synthetic_accuracy,
    write_report,
)

logger = logging.getLogger("kvzap.compare")

BASELINES = ("random", "knorm", "kvzip_plus")
EVAL_SEED = 7  # generate_rows seed of the evaluated rows (the training texts use 240601 and up)


def baseline_press(name: str, ratio: float):
    if name == "random":
        return RandomPress(compression_ratio=ratio, seed=0)
    if name == "knorm":
        return KnormPress(compression_ratio=ratio)
    if name == "kvzip_plus":
        return KVzipPress(compression_ratio=ratio, kvzip_plus_normalization=True)
    raise ValueError(f"unknown baseline {name!r}; baselines: {BASELINES}")


def run_rows(pipe, rows: list[dict], press) -> tuple[list[str], list[float]]:
    """The pipeline's answers, and the achieved compression of DMSPress on each row (None for other presses)."""
    answers, ratios = [], []
    for row in rows:
        output = pipe(
            row["context"],
            question=row["question"],
            answer_prefix=row["answer_prefix"],
            press=press,
            max_new_tokens=int(row["max_new_tokens"]),
        )
        answers.append(output["answer"])
        if isinstance(press, DMSPress):
            ratios.append(float(press.compression_ratio))
    return answers, ratios


def compare(
    kvzap_model_path: str,
    thresholds: list[float],
    model_types: list[str],
    rows_per_task: int = 3,
    context_length: int = TRAINED_CONTEXT_LENGTH,
    output: Optional[Path] = None,
    baselines: tuple[str, ...] = BASELINES,
    baseline_types: Optional[list[str]] = None,
) -> dict:
    """Run the cells (see the module docstring); baselines are matched to the surrogates in `baseline_types`
    (default: all of `model_types`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvpress  # noqa: F401  (registers the pipeline task)
    from kvpress.pipeline import KVPressTextGenerationPipeline

    model = AutoModelForCausalLM.from_pretrained(str(REFERENCE_MODEL_DIR)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(REFERENCE_MODEL_DIR))
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device=model.device)
    rows = [
        row
        for task in SYNTHETIC_TASK_NAMES
        for row in generate_synthetic_rows(task, rows_per_task, context_length, tokenizer, seed=EVAL_SEED)
    ]
    results: dict = {"cells": {}}
    if output is not None and Path(output).exists():
        results = json.loads(Path(output).read_text())
    results.update(
        kvzap_model_path=str(kvzap_model_path),
        rows_per_task=rows_per_task,
        context_length=context_length,
        seed=EVAL_SEED,
        threads=torch.get_num_threads(),
    )
    cells = results["cells"]

    def run(key: str, press) -> dict:
        if key in cells:
            return cells[key]
        started = time.perf_counter()
        with torch.no_grad():
            answers, ratios = run_rows(pipe, rows, press)
        scores = synthetic_accuracy(rows, answers)
        cell = {
            "accuracy": {k: round(v, 2) for k, v in scores.items()},
            "seconds": round(time.perf_counter() - started),
        }
        if ratios:
            cell["achieved_ratio"] = round(sum(ratios) / len(ratios), 4)
        cells[key] = cell
        write_report(output, results)
        logger.info("%s: all %.1f %s", key, scores["all"], f"(ratio {cell.get('achieved_ratio')})" if ratios else "")
        return cell

    run("no_press", None)
    for model_type in model_types:
        for threshold in thresholds:
            scorer = KVzapPress(model_type=model_type, kvzap_model_path=str(kvzap_model_path))
            cell = run(f"kvzap_{model_type}|{threshold:g}", DMSPress(scorer, threshold=threshold))
            ratio = cell["achieved_ratio"]
            if baseline_types is not None and model_type not in baseline_types:
                continue
            for name in baselines:
                run(f"{name}|{ratio:.4f}", baseline_press(name, ratio) if ratio > 0 else None)
    results["table"] = table(results, thresholds, model_types, baselines)
    write_report(output, results)
    return results


def table(results: dict, thresholds: list[float], model_types: list[str], baselines=BASELINES) -> str:
    cells = results["cells"]
    header = ["surrogate", "threshold", "achieved ratio", "KVzap", *baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model_type in model_types:
        for threshold in thresholds:
            cell = cells.get(f"kvzap_{model_type}|{threshold:g}")
            if cell is None:
                continue
            ratio = cell["achieved_ratio"]
            values = []
            for name in baselines:
                baseline = cells.get(f"{name}|{ratio:.4f}")
                values.append(f"{baseline['accuracy']['all']:.1f}" if baseline else "")
            lines.append(
                f"| {model_type} | {threshold:g} | {ratio:.3f} | {cell['accuracy']['all']:.1f} | "
                + " | ".join(values)
                + " |"
            )
    full = cells.get("no_press", {}).get("accuracy", {}).get("all")
    return (f"No compression: {full:.1f}\n\n" if full is not None else "") + "\n".join(lines)


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"give comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one threshold")
    return values


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvzap_model_path", required=True, help="kvzap/train.py's output_dir")
    parser.add_argument("--thresholds", type=_floats, default=[-6.5, -6.0, -5.5])
    parser.add_argument("--model_types", default="mlp,linear")
    parser.add_argument("--baseline_types", default=None, help="surrogates the baselines are matched to (default all)")
    parser.add_argument("--rows_per_task", type=int, default=3)
    parser.add_argument("--context_length", type=int, default=TRAINED_CONTEXT_LENGTH)
    parser.add_argument("--output", type=Path, default=None, help="JSON file (resumed when it exists)")
    args = parser.parse_args(argv)
    if args.rows_per_task < 1:
        parser.error(f"--rows_per_task must be at least 1, got {args.rows_per_task}")
    types = [name for name in args.model_types.split(",") if name]
    matched = None if args.baseline_types is None else [name for name in args.baseline_types.split(",") if name]
    results = compare(
        args.kvzap_model_path,
        args.thresholds,
        types,
        args.rows_per_task,
        args.context_length,
        args.output,
        baseline_types=matched,
    )
    print(results["table"])  # noqa: T201 - a script's output
    return results


if __name__ == "__main__":
    main()
