# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Quality table: accuracy of the reference model on the synthetic tasks (RULER-style,
https://arxiv.org/abs/2404.06654) for each press and compression ratio.

The one idea: with a model that really retrieves, a press's quality is one number per ratio: the accuracy on held-out
rows, question-agnostic (the pipeline's default: the context is compressed before the question is seen) and
question-aware (the question is appended to the context, so it is compressed with it). Each (press, ratio, mode)
cell is written to the JSON file as soon as it is done, so an interrupted run resumes where it stopped; a rerun also
retries the cells that failed (their error stays in the file until then). On CUDA, `--workers` is capped by the
GPU's free memory (`worker_limit`: about 3 GiB a worker at 32k tokens).

    python reference/quality.py                                  # GPU: every press, 10 rows per task
    python reference/quality.py --device cpu --rows_per_task 2 --presses random,snapkv --workers 1
    python reference/quality.py --plot_only                      # table and plot from the JSON file

Long contexts (the 32k checkpoint, issue 26: its presses and ratios, both modes, one JSON file per length):

    python reference/quality.py --model_dir reference/model-32k --presses long --ratios 0.5,0.75,0.9 \\
        --context_length 8192 --rows_per_task 5 --workers 12       # then --context_length 32768
    python reference/quality.py --model_dir reference/model-32k --long_table 8192,32768   # the combined table
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from harness.reference_model import REFERENCE_MODEL_32K_DIR, REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH
from reference import write_report

ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("reference.quality")

RATIOS = (0.25, 0.5, 0.75, 0.9)
MODES = ("agnostic", "aware")
RESULTS_DIR = ROOT / "reference" / "results"


def _make(module: str, cls: str, **kwargs) -> Callable[[], Any]:
    def build():
        import importlib

        return getattr(importlib.import_module(f"kvpress.presses.{module}"), cls)(**kwargs)

    return build


def _wrap(module: str, cls: str, inner: Callable[[], Any], name: Optional[str] = None, **kwargs) -> Callable[[], Any]:
    def build():
        import importlib

        press_class = getattr(importlib.import_module(f"kvpress.presses.{module}"), cls)
        return press_class(**{name: inner()}, **kwargs) if name else press_class(inner(), **kwargs)

    return build


# name -> (factory of a press with compression_ratio 0, attention implementation it needs). The first seven are the
# issue's required presses; the others are evaluated when their modules exist and skipped with a reason otherwise.
PRESSES: dict[str, tuple[Callable[[], Any], str]] = {
    "random": (_make("random_press", "RandomPress", seed=0), "sdpa"),
    "knorm": (_make("knorm_press", "KnormPress"), "sdpa"),
    "streaming_llm": (_make("streaming_llm_press", "StreamingLLMPress"), "sdpa"),
    "snapkv": (_make("snapkv_press", "SnapKVPress"), "sdpa"),
    "tova": (_make("tova_press", "TOVAPress"), "sdpa"),
    "expected_attention": (_make("expected_attention_press", "ExpectedAttentionPress"), "sdpa"),
    "adakv_expected_attention": (
        _wrap("adakv_press", "AdaKVPress", _make("expected_attention_press", "ExpectedAttentionPress")),
        "sdpa",
    ),
    "adakv_snapkv": (_wrap("adakv_press", "AdaKVPress", _make("snapkv_press", "SnapKVPress")), "sdpa"),
    "observed_attention": (_make("observed_attention_press", "ObservedAttentionPress"), "eager"),
    "keydiff": (_make("keydiff_press", "KeyDiffPress"), "sdpa"),
    "lagkv": (_make("lagkv_press", "LagKVPress"), "sdpa"),
    "pyramidkv": (_make("pyramidkv_press", "PyramidKVPress"), "sdpa"),
    "cur": (_make("cur_press", "CURPress"), "sdpa"),
    "compactor": (_make("compactor_press", "CompactorPress"), "sdpa"),
    "chunkkv": (_wrap("chunkkv_press", "ChunkKVPress", _make("snapkv_press", "SnapKVPress"), "press"), "sdpa"),
    "critical_snapkv": (_wrap("criticalkv_press", "CriticalKVPress", _make("snapkv_press", "SnapKVPress")), "sdpa"),
    "leverage": (_make("leverage_press", "LeverageScorePress"), "sdpa"),
    "kvzip": (_make("kvzip_press", "KVzipPress"), "sdpa"),
}
REQUIRED = ("random", "knorm", "streaming_llm", "snapkv", "tova", "expected_attention", "adakv_expected_attention")


def _duo_attention_factory(ratio: float):
    """DuoAttention-style press for the reference model: `ratio` of the KV heads become streaming heads (sink 128,
    recent 256), the heads ranked by `duo_attention_on_the_fly` on synthetic haystacks (the registry's
    `duo_attention_synthetic`: the published patterns are for large LLMs, and upstream's texts come from the Hub).
    Its compression ratio follows from the heads, so the factory takes the ratio instead of setting
    `compression_ratio`."""
    from harness.press_registry import PRESS_REGISTRY

    press = PRESS_REGISTRY["duo_attention_synthetic"]
    press.head_compression_ratio = ratio
    return press


# Presses whose factory takes the compression ratio (they cannot be given one afterwards).
RATIO_PRESSES: dict[str, tuple[Callable[[float], Any], str]] = {"duo_attention": (_duo_attention_factory, "sdpa")}
# The long-context table of issue 26: its presses (`--presses long`) and ratios.
LONG_PRESSES = (
    "random",
    "knorm",
    "streaming_llm",
    "snapkv",
    "tova",
    "expected_attention",
    "kvzip",
    "adakv_expected_attention",
    "pyramidkv",
    "duo_attention",
)
LONG_RATIOS = (0.5, 0.75, 0.9)
ALL_PRESSES = tuple(PRESSES) + tuple(RATIO_PRESSES)


def cell_key(press: str, ratio: float, mode: str) -> str:
    return f"{press}|{ratio:g}|{mode}"


def build_press(name: str, ratio: float):
    if name in RATIO_PRESSES:
        return RATIO_PRESSES[name][0](ratio)
    factory, _ = PRESSES[name]
    press = factory()
    if ratio > 0:
        if not hasattr(press, "compression_ratio"):
            raise TypeError(f"{type(press).__name__} has no compression_ratio")
        press.compression_ratio = ratio
    return press


# ---------------------------------------------------------------------------------------------------------------------
# Workers (one model per process; cells are independent)

_WORKER: dict[str, Any] = {}


def _init_worker(model_dir: str, device: str, rows: list[dict]) -> None:
    import torch

    torch.set_num_threads(1)
    if device.startswith("cuda"):
        from reference import cuda_evaluation_attention

        cuda_evaluation_attention()
    _WORKER.update(model_dir=model_dir, device=device, rows=rows, models={})


def _pipeline(attn_implementation: str):
    from reference.evaluate import load_reference, make_pipeline

    models = _WORKER["models"]
    if attn_implementation not in models:
        model, tokenizer = load_reference(_WORKER["model_dir"], device=_WORKER["device"])
        if attn_implementation != "sdpa":
            from transformers import AutoModelForCausalLM

            model = (
                AutoModelForCausalLM.from_pretrained(_WORKER["model_dir"], attn_implementation=attn_implementation)
                .to(_WORKER["device"])
                .eval()
            )
        models[attn_implementation] = make_pipeline(model, tokenizer)
    return models[attn_implementation]


def run_cell(cell: tuple[str, float, str]) -> dict:
    """Accuracy of one (press, ratio, mode) cell, or the error that stopped it."""
    import torch

    from reference.evaluate import accuracy, predict

    name, ratio, mode = cell
    started = time.time()
    on_cuda = _WORKER["device"].startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        press = None if name == "no_press" else build_press(name, ratio)
        attn = "sdpa" if name == "no_press" else {**PRESSES, **RATIO_PRESSES}[name][1]
        pipe = _pipeline(attn)
        rows = _WORKER["rows"]
        predictions = predict(pipe, rows, press=press, question_aware=(mode == "aware"))
        scores = accuracy(rows, predictions)
        return {
            "press": name,
            "ratio": ratio,
            "mode": mode,
            "accuracy": {k: round(v, 2) for k, v in scores.items()},
            "seconds": round(time.time() - started, 1),
            "device": torch.cuda.get_device_name() if on_cuda else "cpu",  # a table's cells may come from several
            **({"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)} if on_cuda else {}),
        }
    except Exception as error:  # a press that fails is skipped, with the reason
        return {
            "press": name,
            "ratio": ratio,
            "mode": mode,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=3),
        }


# ---------------------------------------------------------------------------------------------------------------------
# Table and plot


def table(results: dict, ratios=RATIOS) -> str:
    """Markdown table of the mean accuracy over tasks ("all"), one row per press, one column per (mode, ratio)."""
    cells = results["cells"]
    baseline = {mode: cells.get(cell_key("no_press", 0.0, mode), {}).get("accuracy", {}).get("all") for mode in MODES}
    header = ["press"] + [f"{'q-agnostic' if m == 'agnostic' else 'q-aware'} {r:g}" for m in MODES for r in ratios]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = ", ".join(f"{m}: {baseline[m]:.1f}" for m in MODES if baseline[m] is not None)
    names = [n for n in results.get("presses", []) if n != "no_press"]
    for name in names:
        values = []
        for mode in MODES:
            for ratio in ratios:
                cell = cells.get(cell_key(name, ratio, mode))
                if cell is None:
                    values.append("")
                elif "error" in cell:
                    values.append("fails")
                else:
                    values.append(f"{cell['accuracy']['all']:.1f}")
        if any(values):
            lines.append(f"| `{name}` | " + " | ".join(values) + " |")
    return f"No compression: {base}\n\n" + "\n".join(lines)


def plot(results: dict, path: Path, ratios=RATIOS, required=REQUIRED) -> bool:
    """Accuracy against ratio, one panel per mode. A press keeps one colour in both panels, the legend names every
    press drawn in either, and presses outside `required` (the issue's set of the table) are dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (run again with --plot_only where it is)")
        return False
    cells = results["cells"]
    drawn = [name for name in results.get("presses", []) if name != "no_press"]
    palette = plt.get_cmap("tab20" if len(drawn) > 10 else "tab10")
    colours = {name: palette(i % palette.N) for i, name in enumerate(drawn)}
    handles: dict = {}
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), sharey=True)
    for ax, mode in zip(axes, MODES):
        base = cells.get(cell_key("no_press", 0.0, mode), {}).get("accuracy", {}).get("all")
        for name in drawn:
            xs, ys = ([0.0], [base]) if base is not None else ([], [])
            for ratio in ratios:
                cell = cells.get(cell_key(name, ratio, mode))
                if cell and "accuracy" in cell:
                    xs.append(ratio)
                    ys.append(cell["accuracy"]["all"])
            if len(xs) > 1:
                style = dict(linewidth=2, linestyle="-") if name in required else dict(linewidth=1.2, linestyle="--")
                (line,) = ax.plot(xs, ys, marker="o", label=name, color=colours[name], **style)
                handles.setdefault(name, line)
        ax.set_title(f"question-{mode} ({results['meta']['context_length']} tokens)")
        ax.set_xlabel("compression ratio")
        ax.set_xlim(-0.02, 0.95)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), mean over the 9 synthetic tasks")
    ordered = [handles[name] for name in drawn if name in handles]
    axes[1].legend(
        ordered, [line.get_label() for line in ordered], fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5)
    )
    fig.suptitle(
        "kvpress reference model: accuracy against compression ratio (dashed: presses beyond the required set)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------------


def _weights_digest(model_dir: Path) -> str:
    """The first 16 hex digits of the weights' SHA-256: a table belongs to one checkpoint."""
    from kvpress.resources import weights_digest

    return weights_digest(model_dir) or "missing"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=str(REFERENCE_MODEL_DIR))
    parser.add_argument(
        "--output_dir",
        default=None,
        help=f"default: {RESULTS_DIR} for the shipped model, {RESULTS_DIR / 'model-32k'} for the 32k one (required "
        "for any other)",
    )
    parser.add_argument(
        "--presses",
        default="all",
        help="comma-separated names, 'all' or 'long' (issue 26's: "
        + ", ".join(LONG_PRESSES)
        + "): "
        + ", ".join(ALL_PRESSES),
    )
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    parser.add_argument("--context_length", type=int, default=TRAINED_CONTEXT_LENGTH)
    parser.add_argument("--rows_per_task", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2000, help="seed of the held-out rows")
    parser.add_argument("--device", default=None)
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    parser.add_argument(
        "--time_budget_s",
        type=float,
        default=None,
        help="seconds: with --workers above 1 a deadline (cells still running then are stopped and left for a later "
        "run); in one process, no cell starts after it",
    )
    parser.add_argument("--plot_only", action="store_true", help="only print the table and draw the plot")
    parser.add_argument(
        "--long_table",
        default=None,
        help="comma-separated context lengths: print the table of the quality_<length>.json files of --output_dir "
        "side by side (one column per length, mode and ratio) and exit",
    )
    args = parser.parse_args(argv)
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--ratios must be comma-separated numbers, got {args.ratios!r}")
    if not args.ratios or not all(0 < r < 1 for r in args.ratios):
        parser.error(f"--ratios must be in (0, 1), got {args.ratios}")
    if args.context_length < 1 or args.rows_per_task < 1:
        parser.error("--context_length and --rows_per_task must be >= 1")
    if args.presses == "all":
        names = list(PRESSES)
    elif args.presses == "long":
        names = list(LONG_PRESSES)
    else:
        names = [p.strip() for p in args.presses.split(",") if p.strip()]
    unknown = [name for name in names if name not in ALL_PRESSES]
    if unknown:
        parser.error(f"unknown presses {unknown}; choose among {', '.join(ALL_PRESSES)}, 'all' or 'long'")
    args.press_names = names
    if args.long_table is not None:
        try:
            args.long_table = [int(x) for x in args.long_table.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--long_table must be comma-separated context lengths, got {args.long_table!r}")
    if args.output_dir is None:
        model_dir = Path(args.model_dir).resolve()
        if model_dir == REFERENCE_MODEL_DIR.resolve():
            args.output_dir = str(RESULTS_DIR)
        elif model_dir == REFERENCE_MODEL_32K_DIR.resolve():
            args.output_dir = str(RESULTS_DIR / "model-32k")
        else:
            parser.error(f"--output_dir is required for a model other than the shipped ones ({args.model_dir})")
    return args


def result_names(context_length: int) -> tuple[str, str]:
    """The JSON and plot file names of a table at `context_length`: quality.json/png at the trained length (the
    shipped table), quality_<length>.json/png at any other."""
    if context_length == TRAINED_CONTEXT_LENGTH:
        return "quality.json", "quality.png"
    return f"quality_{context_length}.json", f"quality_{context_length}.png"


def long_table(tables: dict[int, dict], ratios=LONG_RATIOS) -> str:
    """Markdown table of several context lengths side by side: one row per press (those of any table), one column
    per (length, mode, ratio); the first row is the full cache. An empty cell was not run, "fails" failed."""
    lengths = sorted(tables)
    columns = [(length, mode, ratio) for length in lengths for mode in MODES for ratio in ratios]

    def label(length: int, mode: str, ratio: float) -> str:
        return f"{length // 1024}k {'q-agn.' if mode == 'agnostic' else 'q-aware'} {ratio:g}"

    names: list[str] = []
    for length in lengths:
        names += [n for n in tables[length].get("presses", []) if n != "no_press" and n not in names]
    header = ["press"] + [label(*column) for column in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in ["no_press"] + names:
        values = []
        for length, mode, ratio in columns:
            cells = tables[length].get("cells", {})
            cell = cells.get(cell_key(name, 0.0 if name == "no_press" else ratio, mode))
            values.append("" if cell is None else "fails" if "error" in cell else f"{cell['accuracy']['all']:.1f}")
        shown = "full cache" if name == "no_press" else f"`{name}`"
        lines.append(f"| {shown} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def cells_to_run(results: dict, cells: list[tuple[str, float, str]]) -> tuple[list, list]:
    """The cells of `cells` still to run: those without a result, and those whose result is an error (an error can
    be the run's and not the press's: out of memory, a killed worker). Returns (to run, of which retried)."""
    retried = [cell for cell in cells if "error" in results["cells"].get(cell_key(*cell), {})]
    return [cell for cell in cells if cell_key(*cell) not in results["cells"] or cell in retried], retried


# Presses whose cells take several times as long as the others (KVzip: its repeat passes; 72 s against 18-28 s a
# cell at 8k on an H100). Started first, they run beside the short cells instead of after them.
SLOW_PRESSES = ("kvzip",)


def slow_cells_first(cells: list[tuple[str, float, str]]) -> list[tuple[str, float, str]]:
    """`cells` with the cells of `SLOW_PRESSES` first, each group in its own order."""
    return [cell for cell in cells if cell[0] in SLOW_PRESSES] + [cell for cell in cells if cell[0] not in SLOW_PRESSES]


def is_out_of_memory(error: str) -> bool:
    """Whether a cell's recorded error is an out-of-memory error: the run's resources, not the press."""
    return "OutOfMemoryError" in error or "out of memory" in error


# GPU memory of one worker: a CUDA context and the model, plus what grows with the length (the KV cache, the
# hidden states, KVzip's chunked repeat passes). Workers repeat the KV heads for float32 SDPA
# (`reference.repeat_kv_heads_in_float32`), so nothing grows with the square of the length; without that, SDPA's
# math kernel took 43 GiB a worker at 32768 tokens (H100, 2026-12-07). A conservative bound, checked against the
# `peak_gpu_gib` that every CUDA cell records.
_WORKER_BASE_BYTES = 2**30
_WORKER_BYTES_PER_TOKEN = 2**16


def worker_bytes(context_length: int) -> int:
    """Bound on the GPU memory of one worker at `context_length` tokens."""
    return _WORKER_BASE_BYTES + _WORKER_BYTES_PER_TOKEN * context_length


def worker_limit(requested: int, context_length: int, free_bytes: int) -> int:
    """How many workers fit in `free_bytes` of GPU memory at `context_length` (at least 1, at most `requested`)."""
    return max(1, min(requested, int(0.9 * free_bytes // worker_bytes(context_length))))


def main(argv: Optional[list[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.long_table:
        tables = {}
        for length in args.long_table:
            path = output_dir / result_names(length)[0]
            if not path.exists():
                raise FileNotFoundError(f"no table at {length} tokens: {path} (run with --context_length {length})")
            tables[length] = json.loads(path.read_text())
        ratios = LONG_RATIOS if args.ratios == list(RATIOS) else args.ratios  # the long table's ratios by default
        text = long_table(tables, ratios)
        print(text)
        return {"long_table": text, "tables": tables}
    output_dir.mkdir(parents=True, exist_ok=True)
    json_name, png_name = result_names(args.context_length)
    json_path, png_path = output_dir / json_name, output_dir / png_name
    meta = {
        "model_sha256": _weights_digest(Path(args.model_dir)),
        "context_length": args.context_length,
        "rows_per_task": args.rows_per_task,
        "seed": args.seed,
    }
    results: dict = {"meta": meta, "presses": ["no_press"], "cells": {}}
    if json_path.exists():
        previous = json.loads(json_path.read_text())
        if previous.get("meta") == meta:
            results = previous
        else:
            logger.warning("%s was made with other settings %s: starting a new table", json_path, previous.get("meta"))
    for name in args.press_names:
        if name not in results["presses"]:
            results["presses"].append(name)

    if not args.plot_only:
        import torch

        from harness.synthetic.tasks import TASK_NAMES, generate_rows
        from reference.evaluate import load_reference

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        _, tokenizer = load_reference(args.model_dir, device="cpu")
        rows = [
            row
            for task in TASK_NAMES
            for row in generate_rows(task, args.rows_per_task, args.context_length, tokenizer, seed=args.seed)
        ]
        todo = [("no_press", 0.0, mode) for mode in MODES]
        todo += [(name, ratio, mode) for name in args.press_names for mode in MODES for ratio in args.ratios]
        todo, retried = cells_to_run(results, todo)
        todo = slow_cells_first(todo)
        logger.info(
            "%d rows per cell; %d cells to run (%d failed before and are retried), %d done",
            len(rows),
            len(todo),
            len(retried),
            len(results["cells"]) - len(retried),
        )
        failed: set[str] = set()  # presses that failed in this run, other than for memory: their other cells wait
        workers = args.workers
        if device.startswith("cuda") and workers > 1:
            workers = worker_limit(workers, args.context_length, torch.cuda.mem_get_info()[0])
            if workers < args.workers:
                logger.warning(
                    "--workers %d do not fit in the GPU's free memory at %d tokens (about %.1f GiB each): using %d",
                    args.workers,
                    args.context_length,
                    worker_bytes(args.context_length) / 2**30,
                    workers,
                )
        started = time.time()

        def record(result: dict) -> None:
            key = cell_key(result["press"], result["ratio"], result["mode"])
            results["cells"][key] = result
            if "error" in result:
                if is_out_of_memory(result["error"]):
                    logger.warning("%s ran out of memory; a later run retries it: %s", key, result["error"][:200])
                elif result["press"] not in failed:
                    failed.add(result["press"])
                    logger.warning(
                        "press %s fails; its other cells wait for a later run: %s", result["press"], result["error"]
                    )
            write_report(json_path, results)  # atomic: a kill while writing loses no cell

        from tqdm import tqdm

        progress = tqdm(total=len(todo), desc="quality cells", mininterval=5)
        if workers <= 1:
            _init_worker(args.model_dir, device, rows)
            for cell in todo:
                if args.time_budget_s and time.time() - started > args.time_budget_s:
                    logger.warning("time budget reached: %d cells left for a later run", len(todo) - progress.n)
                    break
                if cell[0] in failed:
                    progress.update(1)
                    continue
                record(run_cell(cell))
                progress.update(1)
        else:
            context = mp.get_context("spawn")
            with context.Pool(workers, initializer=_init_worker, initargs=(args.model_dir, device, rows)) as pool:
                # Results in the order the cells finish, each written at once: a slow cell (KVzip) keeps no
                # finished one waiting, and the time budget loses only the cells still running.
                finished = pool.imap_unordered(run_cell, todo)
                for _ in todo:
                    remaining = None
                    if args.time_budget_s:
                        remaining = max(1.0, args.time_budget_s - (time.time() - started))
                    try:
                        record(finished.next(timeout=remaining))
                    except mp.TimeoutError:
                        logger.warning("time budget reached: unfinished cells are left for a later run")
                        pool.terminate()
                        break
                    progress.update(1)
        progress.close()

    print(table(results, args.ratios))
    required = LONG_PRESSES if args.presses == "long" else REQUIRED
    if plot(results, png_path, args.ratios, required):
        logger.info("wrote %s and %s", json_path, png_path)
    return results


if __name__ == "__main__":
    main()
