# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Decode time of each row against a baseline row, over repeated benchmark runs: `python benchmarks/decode_ratio.py`.

The one idea: a decode-time target ("within 1.2x of Knorm at the same kept size", issue 19) is a ratio of two rows,
and in a host-bound eager loop one run of each row cannot settle it (rows with the same GPU work differed by 34 ms
in one H100 run). This script reads the `results.jsonl` of several runs of the same command (`--runs DIR ...`, one
folder per run, as `benchmarks/ragged_cache.sh` writes with `SPEED_REPEATS`), pairs every row with the baseline
row of the same ratio and context in the same run, and reports per row:

- the per-run ratios of `decode_ms_per_token` to the baseline's, and their median;
- the same for `decode_median_block_ms_per_token` (the median 16-step block: a pause or a recompilation in one block
  does not move it), where the rows have it;
- whether the median meets `--target`, and any run's `compiles_during_decode` above 0.

Prints a table, writes `decode_ratio.json` next to the first run (or to `--output`). Rows are matched by press,
loop, context length and batch size; the baseline is `--baseline` (default `knorm`) on `--baseline_loop` (default
`inplace`), with the same compression ratio as the row (the text after the press name's first `:`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional


def read_runs(folders: list[Path]) -> list[list[dict]]:
    """The measured rows (errors left out) of each run folder's results.jsonl; a folder without one is an error."""
    runs = []
    for folder in folders:
        path = folder / "results.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"no results.jsonl in {folder}: pass the folders the benchmark wrote")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs.append([row for row in rows if not row.get("error")])
    return runs


def press_ratio(press: str) -> str:
    """The compression part of a press entry (`adakv_snapkv:0.5` -> `0.5`; `none` -> ``)."""
    return press.split(":", 1)[1] if ":" in press else ""


def row_key(row: dict) -> tuple:
    return (row["press"], row.get("decode_loop", "dynamic"), row["context_length"], row["batch_size"])


def ratios(runs: list[list[dict]], baseline: str, baseline_loop: str, field: str) -> dict[tuple, list[float]]:
    """Per row key, the ratio of `field` to the same run's baseline row (same ratio, context and batch)."""
    out: dict[tuple, list[float]] = {}
    for rows in runs:
        bases = {
            (press_ratio(row["press"]), row["context_length"], row["batch_size"]): row
            for row in rows
            if row["press"].split(":", 1)[0] == baseline and row.get("decode_loop", "dynamic") == baseline_loop
        }
        for row in rows:
            base = bases.get((press_ratio(row["press"]), row["context_length"], row["batch_size"]))
            if base is None or row.get(field) is None or not base.get(field):
                continue
            out.setdefault(row_key(row), []).append(row[field] / base[field])
    return out


def summarize(runs: list[list[dict]], baseline: str, baseline_loop: str, target: float) -> list[dict]:
    """One entry per row key with its per-run ratios, their medians and the verdict against `target`."""
    by_mean = ratios(runs, baseline, baseline_loop, "decode_ms_per_token")
    by_block = ratios(runs, baseline, baseline_loop, "decode_median_block_ms_per_token")
    compiles: dict[tuple, int] = {}
    for rows in runs:
        for row in rows:
            compiles[row_key(row)] = compiles.get(row_key(row), 0) + int(row.get("compiles_during_decode") or 0)
    summary = []
    for key, values in by_mean.items():
        press, loop, context, batch = key
        blocks = by_block.get(key, [])
        median = statistics.median(values)
        summary.append(
            {
                "press": press,
                "decode_loop": loop,
                "context_length": context,
                "batch_size": batch,
                "runs": len(values),
                "ratios": [round(value, 3) for value in values],
                "median_ratio": round(median, 3),
                "block_ratios": [round(value, 3) for value in blocks],
                "median_block_ratio": round(statistics.median(blocks), 3) if blocks else None,
                "meets_target": median <= target,
                "compiles_during_decode": compiles.get(key, 0),
            }
        )
    return sorted(summary, key=lambda entry: (press_ratio(entry["press"]), entry["press"], entry["decode_loop"]))


def format_summary(summary: list[dict], baseline: str, baseline_loop: str, target: float) -> str:
    lines = [
        f"decode ms/token against {baseline} ({baseline_loop} loop) at the same ratio; target {target}x",
        "press | loop | ctx | runs | ratios | median | block median | meets | compiles while timed",
    ]
    for entry in summary:
        block = "-" if entry["median_block_ratio"] is None else f"{entry['median_block_ratio']:.3f}"
        lines.append(
            f"{entry['press']} | {entry['decode_loop']} | {entry['context_length']} | {entry['runs']} | "
            f"{', '.join(f'{value:.2f}' for value in entry['ratios'])} | {entry['median_ratio']:.3f} | {block} | "
            f"{'yes' if entry['meets_target'] else 'no'} | {entry['compiles_during_decode']}"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="run folders, each with results.jsonl")
    parser.add_argument("--baseline", default="knorm", help="press name of the baseline rows (before any ':')")
    parser.add_argument("--baseline_loop", default="inplace")
    parser.add_argument("--target", type=float, default=1.2, help="the largest ratio that meets the target")
    parser.add_argument("--output", type=Path, default=None, help="default: decode_ratio.json beside the first run")
    args = parser.parse_args(argv)
    if args.target <= 0:
        parser.error(f"--target must be a positive ratio, got {args.target}")
    summary = summarize(read_runs(args.runs), args.baseline, args.baseline_loop, args.target)
    if not summary:
        parser.error(f"no row could be paired with a {args.baseline} row on the {args.baseline_loop} loop")
    print(format_summary(summary, args.baseline, args.baseline_loop, args.target))
    output = args.output or args.runs[0].parent / "decode_ratio.json"
    output.write_text(json.dumps({"baseline": args.baseline, "target": args.target, "rows": summary}, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
