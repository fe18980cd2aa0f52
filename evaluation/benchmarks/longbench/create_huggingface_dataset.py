# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Build the LongBench / LongBench-E evaluation dataset (https://arxiv.org/abs/2308.14508) in the harness's columns.

The one idea: LongBench gives each task one prompt template with a `{context}` slot (the long document, to be
compressed) and usually an `{input}` slot (the query). A row's context is the template up to and including the
filled `{context}`; its question is the rest of the template with `{input}` filled, up to the answer cue the template
ends with ("Answer:", "Summary:", ...), which becomes the answer prefix. `max_new_tokens` is LongBench's
generation length for the task. Other columns (`answers`, `all_classes`, `length`) are LongBench's.

The templates and lengths are LongBench's own configuration files, `dataset2prompt.json` and `dataset2maxlen.json`
(in the `config/` folder of https://github.com/THUDM/LongBench); pass the folder that holds them:

    python evaluation/benchmarks/longbench/create_huggingface_dataset.py --config_dir LongBench/config \\
        --task narrativeqa --output narrativeqa.parquet [--longbench_e] [--push_to_hub <org/name>]

The rows come from the Hub dataset `THUDM/LongBench` (network needed once); evaluate the file offline with
`--dataset longbench --data_path narrativeqa.parquet` (`--dataset longbench-e` for a `--longbench_e` file).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pandas as pd

SOURCE = "THUDM/LongBench"
TASKS = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "multifieldqa_zh",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "dureader",
    "gov_report",
    "qmsum",
    "multi_news",
    "vcsum",
    "trec",
    "triviaqa",
    "samsum",
    "lsht",
    "passage_count",
    "passage_retrieval_en",
    "passage_retrieval_zh",
    "lcc",
    "repobench-p",
)
# The tasks LongBench-E has (English and code, with length buckets).
TASKS_E = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
CONFIG_FILES = ("dataset2prompt.json", "dataset2maxlen.json")
# The answer cue a template ends with: its last line when that line ends with a colon (e.g. "Answer:", "摘要：").
ANSWER_CUE = re.compile(r"[^\n]*[:：]\s*$")
OUTPUT_SUFFIXES = (".parquet", ".jsonl")


def read_config(config_dir: str | Path) -> tuple[dict, dict]:
    """`(templates, max_lengths)` from LongBench's `dataset2prompt.json` and `dataset2maxlen.json`."""
    directory = Path(config_dir).expanduser()
    missing = [name for name in CONFIG_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} does not hold LongBench's {' and '.join(missing)}: pass --config_dir with the config/ "
            "folder of https://github.com/THUDM/LongBench (git clone it once where there is network)."
        )
    templates, max_lengths = (json.loads((directory / name).read_text(encoding="utf-8")) for name in CONFIG_FILES)
    return templates, max_lengths


def split_template(template: str) -> tuple[str, str, str]:
    """`(before_context, question_template, answer_prefix)`: the template around its `{context}` slot, the part
    after it (with `{input}` when the task has a query) without the answer cue, and the cue."""
    if template.count("{context}") != 1:
        raise ValueError(f"A LongBench template needs exactly one {{context}} slot, got: {template[:80]!r}...")
    before, after = template.split("{context}")
    if "{input}" in before:
        raise ValueError("A LongBench template with {input} before {context} cannot be split into context/question.")
    cue = ANSWER_CUE.search(after)
    if cue is None:
        return before, after, ""
    return before, after[: cue.start()], after[cue.start() :].strip()


def fill(template: str, **values: str) -> str:
    """`template` with its `{name}` slots replaced (str.format would choke on other braces, e.g. in code)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def build_row(record: dict, task: str, template: str, max_new_tokens: int) -> dict:
    """One harness row from one LongBench record (`context`, `input`, `answers`, `all_classes`, `length`)."""
    for column in ("context", "input", "answers"):
        if column not in record:
            raise ValueError(f"A {task} record has no {column!r} column (columns: {sorted(record)}).")
    before, question_template, answer_prefix = split_template(template)
    all_classes = record.get("all_classes")
    return {
        "context": before + str(record["context"]),
        "question": fill(question_template, input=str(record["input"] or "")),
        "answer_prefix": answer_prefix,
        "answers": list(record["answers"]),
        "all_classes": list(all_classes) if all_classes is not None else None,
        "length": int(record.get("length") or 0),
        "task": task,
        "max_new_tokens": int(max_new_tokens),
    }


def build_dataframe(
    records: Iterable[dict], task: str, templates: dict, max_lengths: dict, longbench_e: bool = False
) -> pd.DataFrame:
    """The harness rows of one task (`task` is the LongBench name; LongBench-E rows are tagged `{task}-e`, the name
    `calculate_metrics_e` strips)."""
    if task not in templates or task not in max_lengths:
        raise ValueError(f"LongBench's configuration has no template or length for task {task!r}.")
    name = f"{task}-e" if longbench_e else task
    rows = [build_row(record, name, templates[task], max_lengths[task]) for record in records]
    if not rows:
        raise ValueError(f"No rows for task {task!r}.")
    return pd.DataFrame(rows)


def load_records(task: str, longbench_e: bool, loader: Optional[Callable[..., Any]] = None) -> list[dict]:
    """The test rows of `task` (`{task}_e` for LongBench-E) from the Hub dataset THUDM/LongBench."""
    subset = f"{task}_e" if longbench_e else task
    if loader is None:
        from datasets import load_dataset as loader
    try:
        return [dict(record) for record in loader(SOURCE, subset, split="test")]
    except Exception as error:  # noqa: BLE001 - offline, missing subset, Hub error: one clear line
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(
            f"Could not load {SOURCE} ({subset}) from the Hugging Face Hub ({type(error).__name__}: {reason}). This "
            "script needs the network (or the dataset in the local Hugging Face cache)."
        ) from error


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the LongBench (or LongBench-E) rows of one task for evaluation/evaluate.py.",
    )
    parser.add_argument("--task", required=True, help=f"a LongBench task: {', '.join(TASKS)}")
    parser.add_argument("--config_dir", required=True, help="LongBench's config/ folder (dataset2prompt.json, ...)")
    parser.add_argument("--output", help="write the rows to this .parquet or .jsonl file")
    parser.add_argument("--push_to_hub", help="push the rows to this Hub dataset (data_dir = task, split test)")
    parser.add_argument("--longbench_e", action="store_true", help="LongBench-E (the {task}_e subsets)")
    args = parser.parse_args(argv)
    tasks = TASKS_E if args.longbench_e else TASKS
    if args.task not in tasks:
        parser.error(f"unknown task {args.task!r} for {'LongBench-E' if args.longbench_e else 'LongBench'}; "
                     f"valid tasks: {', '.join(tasks)}")  # fmt: skip
    if not args.output and not args.push_to_hub:
        parser.error("nothing to do: pass --output FILE and/or --push_to_hub ORG/NAME")
    if args.output and not args.output.endswith(OUTPUT_SUFFIXES):
        parser.error(f"--output must end with {' or '.join(OUTPUT_SUFFIXES)}, got {args.output!r}")
    return args


def write(df: pd.DataFrame, output: str) -> None:
    if output.endswith(".jsonl"):
        df.to_json(output, orient="records", lines=True, force_ascii=False)
    else:
        df.to_parquet(output, index=False)


def main(argv: Optional[list[str]] = None, loader: Optional[Callable[..., Any]] = None) -> int:
    args = parse_args(argv)
    try:
        templates, max_lengths = read_config(args.config_dir)
        records = load_records(args.task, args.longbench_e, loader)
        df = build_dataframe(records, args.task, templates, max_lengths, args.longbench_e)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    if args.output:
        write(df, args.output)
    if args.push_to_hub:
        from datasets import Dataset

        data_dir = f"{args.task}_e" if args.longbench_e else args.task
        Dataset.from_pandas(df).push_to_hub(args.push_to_hub, data_dir=data_dir, split="test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
