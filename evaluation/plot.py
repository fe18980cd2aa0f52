# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Plot score against compression ratio, one line per press, from a results directory (PNG).

    python evaluation/plot.py --results_dir ./results --output results.png [--dataset ruler] [--model ...]

The one idea: every finished run folder holds its config.yaml and metrics.json; reduce each run to its headline
score, group the runs by benchmark and model (one panel each) and by press (one line each, query-aware runs apart),
and draw `no_press` as the horizontal reference line. The points are also printed as a table.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

from evaluation.summary import collect_runs, format_table


def _line_name(run: dict) -> str:
    return run["press_name"] + (" (query-aware)" if run["query_aware"] else "")


def select_runs(runs: list[dict], dataset: Optional[str] = None, model: Optional[str] = None) -> list[dict]:
    """Runs with a score, optionally of one dataset and one model (substring match on the model)."""
    return [
        run
        for run in runs
        if run["score"] is not None
        and run["compression_ratio"] is not None
        and (dataset is None or run["dataset"] == dataset)
        and (model is None or model in run["model"])
    ]


def plot(
    results_dir: str = "./results",
    output: str = "results.png",
    dataset: Optional[str] = None,
    model: Optional[str] = None,
    title: Optional[str] = None,
) -> str:
    """Draw the runs under `results_dir` into the PNG `output` and print their table; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = select_runs(collect_runs(results_dir), dataset, model)
    if not runs:
        raise ValueError(
            f"No finished run with a score under {results_dir}"
            + (f" for dataset {dataset!r}" if dataset else "")
            + (f" and model {model!r}" if model else "")
            + " (a run folder holds config.yaml and metrics.json)."
        )
    panels: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for run in runs:
        panels[(run["dataset"], str(run["data_dir"]), run["model"])].append(run)

    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for axis, ((dataset_name, data_dir, model_name), panel_runs) in zip(axes[0], sorted(panels.items())):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for run in panel_runs:
            lines[_line_name(run)].append((run["compression_ratio"], run["score"]))
        for name, points in sorted(lines.items()):
            points.sort()
            if name.startswith("no_press"):
                axis.axhline(points[0][1], color="gray", linestyle="--", label=name)
                continue
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        axis.set_xlabel("compression ratio")
        axis.set_ylabel("score")
        axis.set_title(title or f"{dataset_name} {data_dir}\n{model_name}", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    output_path = Path(output)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_path, dpi=120)
    plt.close(figure)

    rows = [
        [run["dataset"], run["data_dir"], run["model"], _line_name(run), run["compression_ratio"], run["score"]]
        for run in sorted(runs, key=lambda r: (r["dataset"], r["model"], _line_name(r), r["compression_ratio"]))
    ]
    print(format_table(["dataset", "data", "model", "press", "ratio", "score"], rows))
    return str(output_path)


if __name__ == "__main__":
    import fire

    fire.Fire(plot)
