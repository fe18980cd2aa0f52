# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""`python reason/plot.py --results_dir reason/results`: accuracy and trace length against the cache budget.

One column per dataset; the top row is accuracy, the bottom row the mean number of generated tokens (the trace
length); one line per press, the uncompressed `full` run as a dashed line. Reads every `<run>/metrics.json` under
`results_dir` (nested folders too) and writes the figure and the table behind it (`<output>.csv`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import pandas as pd

logger = logging.getLogger("reason.plot")

COLUMNS = ("dataset", "model", "press_name", "cache_budget", "num_samples", "accuracy", "mean_output_token_count")


def collect(results_dir) -> pd.DataFrame:
    """One row per finished run under `results_dir`: its settings and main metrics."""
    rows = []
    for path in sorted(Path(results_dir).rglob("metrics.json")):
        metrics = json.loads(path.read_text(encoding="utf-8"))
        missing = [column for column in COLUMNS if column not in metrics]
        if missing:
            raise ValueError(f"{path} lacks {missing}; is it a metrics.json of reason/evaluate.py?")
        rows.append({**{column: metrics[column] for column in COLUMNS}, "run_dir": str(path.parent)})
    if not rows:
        raise ValueError(f"No metrics.json under {results_dir}: run reason/evaluate.py first.")
    return pd.DataFrame(rows).sort_values(["dataset", "press_name", "cache_budget"]).reset_index(drop=True)


def plot(table: pd.DataFrame, output) -> Path:
    """Draw the figure of `table` (from `collect`) to `output`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(table["dataset"].unique())
    figure, axes = plt.subplots(2, len(datasets), figsize=(4 * len(datasets), 6.5), squeeze=False)
    metrics = (("accuracy", "accuracy (%)", 100.0), ("mean_output_token_count", "trace length (tokens)", 1.0))
    for column, dataset in enumerate(datasets):
        subset = table[table["dataset"] == dataset]
        for row, (key, label, scale) in enumerate(metrics):
            ax = axes[row][column]
            for press, runs in subset[subset["press_name"] != "full"].groupby("press_name"):
                runs = runs.sort_values("cache_budget")
                ax.plot(runs["cache_budget"], runs[key] * scale, marker="o", label=press)
            for _, baseline in subset[subset["press_name"] == "full"].iterrows():
                ax.axhline(baseline[key] * scale, color="black", linestyle="--", label="full")
            ax.set_xlabel("cache budget (tokens per layer and head)")
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(dataset)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8))
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main(results_dir: str = str(Path(__file__).resolve().parent / "results"), output: Optional[str] = None) -> None:
    """Plot every run under `results_dir` to `output` (default `<results_dir>/sweep.png`) and print the table."""
    table = collect(results_dir)
    output_path = Path(output) if output is not None else Path(results_dir) / "sweep.png"
    plot(table, output_path)
    table.to_csv(output_path.with_suffix(".csv"), index=False)
    print(table.drop(columns=["run_dir"]).to_string(index=False))
    print(f"figure: {output_path}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
