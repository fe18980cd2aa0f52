# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Evaluate a press at a compression ratio on a benchmark: `python evaluation/evaluate.py [--flag value ...]`.

The one idea (upstream kvpress's evaluation harness, https://github.com/NVIDIA/kvpress): run the
"kv-press-text-generation" pipeline over a dataset, compressing each context once and answering its questions, then
score the answers with the benchmark's metric. Configuration is layered: dataclass defaults, then
`evaluate_config.yaml`, then command-line flags. Each run writes `predictions.csv`, `metrics.json` and `config.yaml`
to its own directory; a finished run is skipped (unless `--force` or its data changed), an interrupted one resumes,
and under `accelerate launch` each process answers a shard of the rows and the main process merges them.

No lost or stale results: everything is validated (press, rows, metric, model) before a file is touched, a run
folder is locked while a run writes to it, earlier results are replaced only once new ones exist, and no path
leaves `--output_dir`.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import pandas as pd
import torch
import yaml

from evaluation.data import BASE_COLUMNS, check_columns, check_rows, load_synthetic
from evaluation.evaluate_registry import (
    DATASET_REGISTRY,
    DEFAULT_DATA_DIR,
    PRESS_REGISTRY,
    REQUIRED_COLUMNS,
    SCORER_REGISTRY,
)
from evaluation.summary import comparison_table, headline_score, run_summary
from harness.data import data_fingerprint, load_hub_dataset, load_local_dataset, row_fingerprint
from harness.process_group import ProcessGroup
from harness.reference_model import REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH
from harness.results import (
    PartialResults,
    RunLock,
    RunLockedError,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    check_inside,
    merge_predictions,
    remove_inside,
    shard,
)

logger = logging.getLogger("evaluation")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent / "evaluate_config.yaml"
# `--model reference` (the default) is the project's own small model, shipped in reference/model/.
REFERENCE_MODEL = "reference"
KV_CACHES = ("dynamic", "quantized")
KV_CACHE_BACKENDS = ("quanto", "hqq", "fp8")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Fields that do not change the results: a finished or partial run is reused whatever their value.
NON_RESULT_FIELDS = ("output_dir", "log_level", "force", "device", "device_map", "press_init_command", "progress")
# Saved in config.yaml next to the options: the hash of the rows evaluated (a finished run is reused only for them).
DATA_FINGERPRINT = "data_fingerprint"
# Earlier results a rerun replaces wait here until the new results are written (then the folder is removed).
REPLACED_DIR = ".replaced"
# Characters kept in the parts of a results directory name; every other run of characters becomes "_".
UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._,+=-]+")
# Metrics not tried on a placeholder answer before a run: LooGLE's BERTScore would load a large model for it.
METRICS_NOT_CHECKED = ("loogle",)


def name_component(value: Any) -> str:
    """One part of a results directory name, with path separators and other unsafe characters replaced."""
    return UNSAFE_NAME_CHARACTERS.sub("_", str(value))


def reference_model() -> tuple[Path, Optional[int]]:
    """`(REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH)`: the model `--model reference` loads, and its trained length."""
    return Path(REFERENCE_MODEL_DIR), TRAINED_CONTEXT_LENGTH


def _is_positive_int(value: Any) -> bool:
    return bool(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0)


def _in_unit_interval(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def nested_presses(press: Any) -> list:
    """A press and every press inside it (wrappers' `press` / `base_press`, compositions' `presses`)."""
    found: list = []
    stack = [press]
    while stack:
        current = stack.pop()
        if current is None:
            continue
        found.append(current)
        for attribute in ("press", "base_press"):
            inner = getattr(current, attribute, None)
            if inner is not None and hasattr(inner, "forward_hook"):
                stack.append(inner)
        stack.extend(getattr(current, "presses", None) or [])
    return found


def query_aware_press(press: Any) -> Any:
    """The press (nested or not) that compresses with the question (FinchPress: it adds a delimiter token), or None."""
    return next((p for p in nested_presses(press) if hasattr(p, "update_model_and_tokenizer")), None)


def takes_field(press: Any, name: str) -> bool:
    """Whether `press` has a dataclass field `name` (what the CLI sets on it: threshold, target_size, ...)."""
    return press is not None and name in getattr(type(press), "__dataclass_fields__", {})


def is_decoding_press(press: Any) -> bool:
    """Presses that compress while the answer is generated: one pipeline call per question. Decided as the pipeline
    decides it: the press's `acts_during_decoding` capability, or a composition (`presses`) holding such a press
    (a ComposedPress with a budget press inside acts during decoding, although the ComposedPress itself does not
    say so)."""
    if press is None:
        return False
    if getattr(press, "acts_during_decoding", False):
        return True
    inner = getattr(press, "presses", None)
    return isinstance(inner, (list, tuple)) and any(is_decoding_press(p) for p in inner)


# Options that only some presses take: (option, the press field it sets).
PRESS_OPTIONS = (
    ("threshold", "threshold"),
    ("head_compression_ratio", "head_compression_ratio"),
    ("key_channel_compression_ratio", "key_channel_compression_ratio"),
    ("compression_interval", "compression_interval"),
    ("target_size", "target_size"),
    ("hidden_states_buffer_size", "hidden_states_buffer_size"),
)


def check_press_options(config: "EvaluationConfig", press: Any) -> None:
    """Refuse an option that no press of the run takes (upstream ignores it, yet names the results folder after a
    threshold or head ratio the press never used)."""
    presses = nested_presses(press)
    for option, field_name in PRESS_OPTIONS:
        if getattr(config, option) is not None and not any(takes_field(p, field_name) for p in presses):
            takers = {
                "threshold": "DMS/KVzap presses (kvzap_linear, kvzap_mlp)",
                "head_compression_ratio": "DuoAttention (duo_attention, duo_attention_on_the_fly)",
                "key_channel_compression_ratio": "ThinK (think, snap_think)",
            }.get(option, "decoding presses (decoding_*, cam_*)")
            raise ValueError(
                f"Press {config.press_name!r} takes no {option} (set to {getattr(config, option)!r}); it is an option "
                f"of {takers}. Leave it unset for this press."
            )


@dataclass
class EvaluationConfig:
    """Every option of a run (upstream's fields first, in upstream's order, then this fork's)."""

    dataset: str = "synthetic"
    data_dir: Optional[str] = None
    model: str = REFERENCE_MODEL
    device: Optional[str] = None
    press_name: str = "knorm"
    compression_ratio: float = 0.5
    key_channel_compression_ratio: Optional[float] = None
    head_compression_ratio: Optional[float] = None
    threshold: Optional[float] = None
    fraction: float = 1.0
    max_new_tokens: Optional[int] = None
    max_context_length: Optional[int] = None
    query_aware: bool = False
    needle_depth: Optional[Union[int, List[int]]] = None
    compression_interval: Optional[int] = None
    target_size: Optional[int] = None
    hidden_states_buffer_size: Optional[int] = None
    output_dir: str = "./results"
    log_level: str = "INFO"
    model_kwargs: Optional[Dict[str, Any]] = None
    press_init_command: Optional[str] = None
    seed: int = 42
    fp8: bool = False
    # This fork's options.
    data_path: Optional[str] = None  # a local dataset (saved dir, .parquet, .jsonl) instead of the Hub
    max_samples: Optional[int] = None  # keep at most this many rows (after `fraction`)
    num_samples: int = 20  # synthetic: rows generated per task (and per context length)
    context_length: Optional[Union[int, List[int]]] = None  # synthetic: context tokens (default: trained length)
    device_map: Optional[str] = None  # passed to from_pretrained (default "auto" when the device is "auto")
    kv_cache: str = "dynamic"  # "dynamic" or "quantized"
    kv_cache_backend: str = "quanto"  # quantized cache backend: "quanto", "hqq" or "fp8"
    kv_cache_nbits: Optional[int] = None  # bits of the quanto/hqq quantized cache (the backend's default if None)
    trust_remote_code: bool = False
    cache_budget: Optional[int] = None  # entries kept per layer and KV head in prefill and decoding (not the ratio)
    force: bool = False  # rerun even if the results exist
    progress: bool = True  # show the progress bar

    def __post_init__(self):
        if self.dataset not in DATASET_REGISTRY or self.dataset not in SCORER_REGISTRY:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}; valid datasets: {', '.join(sorted(DATASET_REGISTRY))}."
            )
        PRESS_REGISTRY.spec(self.press_name)  # raises on an unknown name, listing the valid ones
        if self.cache_budget is not None:
            if not _is_positive_int(self.cache_budget):
                raise ValueError(
                    f"cache_budget must be a positive integer (cache entries kept per layer and KV head), got "
                    f"{self.cache_budget!r}; leave it unset to compress by compression_ratio."
                )
            if self.press_name == "no_press":
                raise ValueError("no_press compresses nothing, so it takes no cache_budget; use press_name full.")
            self.cache_budget = int(self.cache_budget)
            self.compression_ratio = 0.0  # the budget replaces the ratio (a press refuses both)
        if self.press_name == "no_press":
            self.compression_ratio = 0.0
        is_ratio = isinstance(self.compression_ratio, (int, float)) and not isinstance(self.compression_ratio, bool)
        if not is_ratio or not 0 <= self.compression_ratio < 1:
            raise ValueError(
                f"compression_ratio must be a number in [0, 1), got {self.compression_ratio!r}: it is the fraction "
                "of the KV cache that is removed (0.5 keeps half of it)."
            )
        for name in ("key_channel_compression_ratio", "head_compression_ratio"):
            value = getattr(self, name)
            if value is not None and not _in_unit_interval(value):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1] (the share of the rows evaluated), got {self.fraction!r}.")
        for name in ("max_new_tokens", "max_context_length", "max_samples", "kv_cache_nbits"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if not _is_positive_int(self.num_samples):
            raise ValueError(f"num_samples must be a positive integer, got {self.num_samples!r}.")
        for name in ("needle_depth", "context_length"):
            value = getattr(self, name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}.")
        if isinstance(self.needle_depth, tuple):
            self.needle_depth = list(self.needle_depth)
        if isinstance(self.context_length, tuple):
            self.context_length = list(self.context_length)
        if self.dataset == "needle_in_haystack" and (self.needle_depth is None or self.max_context_length is None):
            raise ValueError(
                "The needle_in_haystack dataset needs --needle_depth (a percentage or a list of them) and "
                "--max_context_length (the haystack size in tokens)."
            )
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}.")
        if self.kv_cache_backend not in KV_CACHE_BACKENDS:
            raise ValueError(
                f"kv_cache_backend must be one of {', '.join(KV_CACHE_BACKENDS)}, got {self.kv_cache_backend!r}."
            )
        if str(self.log_level).upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}.")
        if self.model_kwargs is None:
            self.model_kwargs = {}
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a mapping (e.g. {{dtype: auto}}), got {self.model_kwargs!r}.")
        if self.data_dir is None and self.data_path is None:
            self.data_dir = DEFAULT_DATA_DIR.get(self.dataset)
        if self.data_dir is not None:
            self.data_dir = str(self.data_dir)
        if self.dataset == "synthetic" and self.data_path is None and self.context_length is None:
            self.context_length = reference_model()[1]  # resolved here so that config.yaml records it

    # ----------------------------------------------------------------------------------------------------------
    def model_tag(self) -> str:
        """The model's part of the results directory name."""
        if self.model == REFERENCE_MODEL:
            return REFERENCE_MODEL
        path = Path(self.model).expanduser()
        if path.exists():
            return "--".join(path.resolve().parts[-2:])
        return self.model.strip("/").replace("/", "--")

    def ratio_tag(self) -> str:
        if self.cache_budget is not None:
            return f"budget{self.cache_budget}"
        if self.threshold is not None:
            return f"{self.threshold:.2f}"
        if self.head_compression_ratio is not None:
            return f"{self.head_compression_ratio:.2f}"
        return f"{self.compression_ratio:.2f}"

    def get_results_dir(self, output_dir: Union[str, Path, None] = None) -> Path:
        """`<output_dir>/<dataset>__<data>__<model>__<press>__<ratio>[__options]`, the same for the same run.

        Upstream appends a numbered subfolder when the directory exists, so it never finds earlier results; here
        the name is a function of the options that change the results, so reruns are skipped or resumed.
        """
        data = Path(self.data_path).stem if self.data_path else (self.data_dir or "")
        parts = [self.dataset, data, self.model_tag(), self.press_name, self.ratio_tag()]
        if self.fraction < 1:
            parts.append(f"fraction{self.fraction:.3f}")
        if self.max_context_length is not None:
            parts.append(f"max_context{self.max_context_length}")
        if self.query_aware:
            parts.append("query_aware")
        if self.key_channel_compression_ratio is not None:
            parts.append(f"key_channel_cr{self.key_channel_compression_ratio:.2f}")
        if self.dataset == "needle_in_haystack":
            depths = self.needle_depth if isinstance(self.needle_depth, list) else [self.needle_depth]
            parts.append("needle_depth" + "-".join(str(depth) for depth in depths))
        if self.dataset == "synthetic" and self.data_path is None:
            lengths = self.context_lengths()
            parts.append("ctx" + "-".join(str(length) for length in lengths) + f"__n{self.num_samples}")
        if self.max_samples is not None:
            parts.append(f"max_samples{self.max_samples}")
        if self.max_new_tokens is not None:
            parts.append(f"max_new_tokens{self.max_new_tokens}")
        for name, tag in (("compression_interval", "interval"), ("target_size", "target"),
                          ("hidden_states_buffer_size", "buffer")):  # fmt: skip
            if getattr(self, name) is not None:
                parts.append(f"{tag}{getattr(self, name)}")
        if self.kv_cache == "quantized":
            parts.append(f"kv_{self.kv_cache_backend}{self.kv_cache_nbits or ''}")
        if self.fp8:
            parts.append("fp8")
        if self.seed != 42:
            parts.append(f"seed{self.seed}")
        name = "__".join(name_component(part) for part in parts if part != "")
        root = Path(output_dir if output_dir is not None else self.output_dir)
        return check_inside(root / name, root)

    def context_lengths(self) -> list[int]:
        """Synthetic context lengths: `context_length`, else the reference model's trained length."""
        if self.context_length is not None:
            values = self.context_length if isinstance(self.context_length, list) else [self.context_length]
            return [int(value) for value in values]
        trained = reference_model()[1]
        if trained is None:
            raise ValueError(
                "Synthetic rows need a context length: pass --context_length (tokens); the reference package does "
                "not define TRAINED_CONTEXT_LENGTH."
            )
        return [int(trained)]

    def to_dict(self) -> dict:
        """The resolved configuration, as saved in config.yaml (threshold / head ratio replace the ratio)."""
        config = asdict(self)
        if self.threshold is not None or self.head_compression_ratio is not None:
            config.pop("compression_ratio")
        for name in ("threshold", "head_compression_ratio", "cache_budget"):
            if config.get(name) is None:
                config.pop(name, None)
        return config

    def save_config(self, path: Union[str, Path], fingerprint: Optional[str] = None) -> None:
        """config.yaml: the resolved configuration and, when given, the fingerprint of the rows evaluated."""
        values = self.to_dict()
        if fingerprint is not None:
            values[DATA_FINGERPRINT] = fingerprint
        text = yaml.dump(values, default_flow_style=False, indent=2, sort_keys=False)
        atomic_write_text(Path(path), text)


def load_config(config_file: Union[str, Path, None] = None, **overrides: Any) -> EvaluationConfig:
    """Dataclass defaults, then the YAML file (default: evaluate_config.yaml next to this script), then `overrides`
    whose value is not None. One run: a list of press names (the shipped default) needs `load_configs`."""
    configs = load_configs(config_file, **overrides)
    if len(configs) != 1:
        raise ValueError(
            f"press_name lists {len(configs)} presses ({', '.join(c.press_name for c in configs)}): that is one run "
            "per press; use load_configs, or pass a single --press_name."
        )
    return configs[0]


def press_names(value: Any) -> list:
    """`press_name` as a list: a name, a list of names, or a comma-separated string (`--press_name knorm,snapkv`)."""
    if isinstance(value, str) and "," in value:
        value = [name.strip() for name in value.split(",")]
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(name, str) and name for name in value):
            raise ValueError(f"press_name must be a press name or a non-empty list of them, got {value!r}.")
        if len(set(value)) != len(value):
            raise ValueError(f"press_name lists a press twice: {list(value)!r}.")
        return list(value)
    return [value]


def load_configs(config_file: Union[str, Path, None] = None, **overrides: Any) -> list[EvaluationConfig]:
    """The configurations of a command: one per press when `press_name` is a list (each run has its own results
    folder, so each is skipped or resumed on its own), all checked before anything runs."""
    explicit = config_file is not None
    path = Path(config_file).expanduser() if explicit else DEFAULT_CONFIG_FILE
    file_values: dict = {}
    if path.exists():
        file_values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(file_values, dict):
            raise ValueError(f"{path} must hold a mapping of option: value, got {type(file_values).__name__}.")
    elif explicit:
        raise FileNotFoundError(f"Config file {path} does not exist.")
    else:
        logger.warning("Config file %s not found; using the defaults and the command-line options.", path)
    given = {key: value for key, value in overrides.items() if value is not None}
    merged = {**file_values, **given}
    if merged.get("cache_budget") is not None and "compression_ratio" in given:
        raise ValueError(
            f"Both --compression_ratio {given['compression_ratio']} and --cache_budget {merged['cache_budget']} were "
            "given; choose one: the ratio prunes a fraction of the context once after prefill, the budget keeps at "
            "most that many entries per layer and KV head through prefill and decoding."
        )
    valid = [f.name for f in fields(EvaluationConfig)]
    unknown = sorted(set(merged) - set(valid))
    if unknown:
        raise ValueError(f"Unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}.")
    return [
        EvaluationConfig(**{**merged, "press_name": name}) for name in press_names(merged.get("press_name", "knorm"))
    ]


def configure_logging(level: str) -> None:
    level_number = getattr(logging, str(level).upper())
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s")
    for name in ("evaluation", "kvpress"):
        logging.getLogger(name).setLevel(level_number)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


class EvaluationRunner:
    """Runs one configuration: press, model, data, inference (resumable, sharded), predictions and metrics."""

    def __init__(self, config: EvaluationConfig, process_group: Optional[ProcessGroup] = None):
        self.config = config
        self.group = process_group or ProcessGroup.from_environment()
        configure_logging(config.log_level)
        set_seed(config.seed)
        self.press: Any = None
        self.pipeline: Any = None
        self.df: Optional[pd.DataFrame] = None
        self.tokenizer: Any = None
        self._model_path: Optional[str] = None
        self._stash: Optional[Path] = None

    # -- the run --------------------------------------------------------------------------------------------------
    def run_evaluation(self) -> Optional[dict]:
        """Evaluate, or reuse finished results. Returns the metrics on the main process (None on the others).

        Everything that can fail on bad input is checked before a file is touched: the results path (inside
        `output_dir`), the press, every row, the metric (a placeholder answer per task) and the model (loaded). Then
        the run folder is locked, and earlier results (`--force`, or rows that changed) are moved aside only when the
        new ones are written, and removed once they are.
        """
        config = self.config
        output_dir = Path(config.output_dir)
        results_dir = config.get_results_dir()  # its name sanitised, checked to resolve inside output_dir
        self.press = self._setup_press()
        rows = self._load_rows()
        self._check_metric(rows)
        fingerprint = data_fingerprint(rows)
        finished = self._finished_metrics(results_dir, fingerprint)
        if finished is not None:
            return self._report_finished(results_dir, finished)

        output_dir.mkdir(parents=True, exist_ok=True)
        created = not results_dir.exists()
        lock = RunLock(results_dir / f".lock.rank{self.group.rank}")
        lock.acquire()
        try:
            check_inside(results_dir, output_dir)
            # A run that finished between the check above and taking the lock.
            finished = self._finished_metrics(results_dir, fingerprint, quiet=True)
            if finished is not None:
                return self._report_finished(results_dir, finished)
            return self._evaluate(results_dir, rows, fingerprint)
        finally:
            lock.release()
            if created:
                try:
                    results_dir.rmdir()  # only when empty: a run that failed before writing anything
                except OSError:
                    pass

    def _evaluate(self, results_dir: Path, rows: pd.DataFrame, fingerprint: str) -> Optional[dict]:
        """Load the model, answer the rows (resuming saved answers unless `--force`), write the results."""
        config = self.config
        predictions_file, metrics_file = results_dir / "predictions.csv", results_dir / "metrics.json"
        config_file = results_dir / "config.yaml"
        partial = PartialResults(results_dir)
        partial_config = partial.directory / "config.yaml"
        if self.group.is_main and not config.force and partial.exists():
            self._check_same_config(partial_config if partial_config.exists() else config_file)

        self.pipeline = self._setup_model_pipeline()
        self.df = self._finish_rows(rows)
        if self.group.is_main:
            if config.force:
                self._set_aside(results_dir, [partial.directory])  # a forced run starts over
            config.save_config(partial_config, fingerprint)  # the configuration of the answers being saved
        self.group.wait()

        started = time.time()
        self._run_inference(self.df, partial)
        if not self.group.is_main:
            return None
        # No collective barrier here (it would time out while slower shards still run): the main process waits
        # until every row has a saved answer.
        records = wait_for_all_rows(partial, self.df, self.group.world_size)
        df = merge_predictions(self.df, records)
        table = self._predictions_table(df)
        metrics = SCORER_REGISTRY[config.dataset](df)
        # Only now are earlier results replaced: moved aside, the new ones written (metrics.json, which marks a run
        # as finished, last), then the earlier ones removed.
        self._set_aside(results_dir, [predictions_file, metrics_file, config_file])
        atomic_write_csv(predictions_file, table)
        config.save_config(config_file, fingerprint)
        atomic_write_json(metrics_file, metrics)
        remove_inside(partial.directory, results_dir)
        remove_inside(results_dir / REPLACED_DIR, results_dir)
        logger.info("Evaluated %d rows in %.1f s; results in %s", len(df), time.time() - started, results_dir)
        print(run_summary(config.to_dict(), metrics, len(df), results_dir))
        return metrics

    def _finished_metrics(self, results_dir: Path, fingerprint: str, quiet: bool = False) -> Optional[Any]:
        """The saved metrics when `results_dir` holds a finished run of this configuration on these rows, else None
        (no finished run, `--force`, or rows that changed since: those runs are evaluated again)."""
        predictions_file, metrics_file = results_dir / "predictions.csv", results_dir / "metrics.json"
        if not (predictions_file.exists() and metrics_file.exists()):
            return None
        if self.config.force:
            if not quiet:
                logger.info(
                    "--force: evaluating again; the results in %s are replaced once new ones exist.", results_dir
                )
            return None
        saved = self._check_same_config(results_dir / "config.yaml") or {}
        saved_fingerprint = saved.get(DATA_FINGERPRINT)
        if saved_fingerprint == fingerprint:
            return _read_json(metrics_file)
        if not quiet:
            logger.warning(
                "The results in %s were computed on other rows (data fingerprint %s, now %s): evaluating again; "
                "they are replaced once the new results are written.",
                results_dir,
                saved_fingerprint or "not recorded",
                fingerprint,
            )
        return None

    def _report_finished(self, results_dir: Path, metrics: Any) -> Optional[Any]:
        logger.info("Results already exist in %s; skipping (pass --force to run again).", results_dir)
        if not self.group.is_main:
            return None
        n_rows = len(pd.read_csv(results_dir / "predictions.csv"))
        saved = _read_yaml(results_dir / "config.yaml") or self.config.to_dict()
        print(run_summary(saved, metrics, n_rows, results_dir))
        return metrics

    def _set_aside(self, results_dir: Path, paths: list[Path]) -> None:
        """Move the existing `paths` into `<results_dir>/.replaced/<time>-<pid>/` (removed once new results exist)."""
        existing = [path for path in paths if path.exists()]
        if not existing:
            return
        if self._stash is None:
            self._stash = results_dir / REPLACED_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        stash = check_inside(self._stash, results_dir)
        stash.mkdir(parents=True, exist_ok=True)
        for path in existing:
            check_inside(path, results_dir)
            os.replace(path, stash / path.name)
        logger.info("Moved %s aside to %s until the new results are written.", [p.name for p in existing], stash)

    def _check_same_config(self, config_file: Path) -> Optional[dict]:
        """Refuse to mix results of a different configuration that landed in the same directory; returns the saved
        configuration (None when there is none)."""
        saved = _read_yaml(config_file)
        if not saved:
            return saved
        current = self.config.to_dict()
        differences = sorted(
            name
            for name in set(saved) | set(current)
            if name not in NON_RESULT_FIELDS and name != DATA_FINGERPRINT and saved.get(name) != current.get(name)
        )
        if differences:
            raise ValueError(
                f"{config_file.parent} holds results of a different configuration (differences: "
                f"{', '.join(differences)}). Pass --force to overwrite them, or choose another --output_dir."
            )
        return saved

    # -- setup ----------------------------------------------------------------------------------------------------
    def _setup_press(self):
        """A fresh press for `press_name`, with the configured ratio (or threshold, head ratio, ...)."""
        config = self.config
        if config.cache_budget is not None:
            return self._setup_budget_press()
        press = PRESS_REGISTRY[config.press_name]
        if press is None:
            logger.warning("No press: the KV cache is not compressed (compression_ratio 0).")
        elif takes_field(press, "head_compression_ratio"):
            if config.head_compression_ratio is None:
                raise ValueError(f"Press {config.press_name!r} needs --head_compression_ratio.")
            press.head_compression_ratio = config.head_compression_ratio
        elif takes_field(press, "threshold"):
            if config.threshold is None:
                raise ValueError(f"Press {config.press_name!r} needs --threshold.")
            press.threshold = config.threshold
        elif takes_field(press, "presses"):
            for inner in press.presses:
                if takes_field(inner, "key_channel_compression_ratio"):
                    if config.key_channel_compression_ratio is None:
                        raise ValueError(f"Press {config.press_name!r} needs --key_channel_compression_ratio.")
                    inner.key_channel_compression_ratio = config.key_channel_compression_ratio
                elif hasattr(inner, "compression_ratio"):
                    inner.compression_ratio = config.compression_ratio
                else:
                    logger.warning("%s has no compression_ratio; left as is.", type(inner).__name__)
        elif takes_field(press, "key_channel_compression_ratio"):
            if config.key_channel_compression_ratio is None:
                raise ValueError(f"Press {config.press_name!r} needs --key_channel_compression_ratio.")
            press.key_channel_compression_ratio = config.key_channel_compression_ratio
        elif takes_field(press, "target_size"):
            for name in ("compression_interval", "target_size", "hidden_states_buffer_size"):
                if getattr(config, name):  # upstream: only a set (truthy) value replaces the press's own
                    setattr(press, name, getattr(config, name))
        elif hasattr(press, "compression_ratio"):
            press.compression_ratio = config.compression_ratio
        else:
            logger.warning("%s has no compression_ratio; left as is.", type(press).__name__)
        check_press_options(config, press)
        config.press_init_command = repr(press)
        return press

    def _setup_budget_press(self):
        """A fresh press for `press_name` with `cache_budget` (a budget press keeps at most that many entries per
        layer and KV head through prefill and decoding); inner ThinK presses of a composition get their channel
        ratio."""
        config = self.config
        budget = int(config.cache_budget)  # type: ignore[arg-type]
        spec = PRESS_REGISTRY.spec(config.press_name)
        press = PRESS_REGISTRY[config.press_name]  # checks the press exists in this version
        if not any(
            takes_field(p, "compression_ratio") or takes_field(p, "cache_budget") for p in nested_presses(press)
        ):
            logger.info(
                "Press %s keeps the whole cache; cache_budget=%d only names the run.", config.press_name, budget
            )
        else:
            press = spec.with_cache_budget(budget).build()  # type: ignore[union-attr]
        for inner in nested_presses(press):
            if takes_field(inner, "key_channel_compression_ratio"):
                if config.key_channel_compression_ratio is None:
                    raise ValueError(f"Press {config.press_name!r} needs --key_channel_compression_ratio.")
                inner.key_channel_compression_ratio = config.key_channel_compression_ratio
        check_press_options(config, press)
        config.press_init_command = repr(press)
        return press

    def _resolve_model(self) -> str:
        """The model to load: the reference model's directory, a local directory, or a Hub id checked to exist."""
        if self._model_path is None:
            self._model_path = self._find_model()
        return self._model_path

    def _find_model(self) -> str:
        model = self.config.model
        if model == REFERENCE_MODEL:
            directory = reference_model()[0]
            if not (directory / "config.json").exists():
                raise FileNotFoundError(
                    f"The default model is the project's reference model, expected in {directory}, which has no "
                    "checkpoint. Create it with `python reference/train.py` (see reference/README.md), "
                    "or pass --model <Hugging Face Hub id or local model directory>."
                )
            return str(directory)
        path = Path(model).expanduser()
        if path.exists():
            return str(path)
        if model.startswith((".", "/", "~")) or model.count("/") > 1:
            raise FileNotFoundError(
                f"The model directory {model} does not exist; pass a Hugging Face Hub id (org/name) or an existing "
                "local directory saved with save_pretrained."
            )
        check_hub_model(model)
        return model

    def _get_tokenizer(self):
        """The model's tokenizer (loaded alone when the data needs it before the model, e.g. synthetic rows)."""
        if self.pipeline is not None:
            return self.pipeline.tokenizer
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(
                self._resolve_model(), trust_remote_code=self.config.trust_remote_code
            )
        return self.tokenizer

    def _setup_model_pipeline(self):
        from transformers import pipeline

        import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)

        config = self.config
        model_kwargs = dict(config.model_kwargs or {})
        if config.fp8:
            from transformers import FineGrainedFP8Config

            model_kwargs["quantization_config"] = FineGrainedFP8Config()
        if any(getattr(p, "needs_attention_weights", False) for p in nested_presses(self.press)):
            model_kwargs["attn_implementation"] = "eager"
        elif model_kwargs.get("attn_implementation") is None:
            try:
                import flash_attn  # noqa: F401

                model_kwargs["attn_implementation"] = "flash_attention_2"
            except ImportError:
                model_kwargs.pop("attn_implementation", None)

        device = config.device
        if self.group.world_size > 1 and torch.cuda.is_available():
            device = f"cuda:{self.group.local_rank}"
        elif device is None:
            device = "auto" if torch.cuda.is_available() else "cpu"
        pipeline_kwargs: dict = {"model_kwargs": model_kwargs, "trust_remote_code": config.trust_remote_code}
        if device == "auto" or config.device_map is not None:
            pipeline_kwargs["device_map"] = config.device_map or "auto"
        else:
            pipeline_kwargs["device"] = device
        if self.tokenizer is not None:
            pipeline_kwargs["tokenizer"] = self.tokenizer
        pipe = pipeline("kv-press-text-generation", model=self._resolve_model(), **pipeline_kwargs)
        pipe.model.eval()
        return pipe

    def _load_raw_dataframe(self) -> tuple[pd.DataFrame, str]:
        config = self.config
        if config.data_path is not None:
            return load_local_dataset(config.data_path), str(Path(config.data_path).expanduser())
        if config.dataset == "synthetic":
            df = load_synthetic(
                config.data_dir,
                config.num_samples,
                config.context_lengths(),
                tokenizer=self._get_tokenizer(),
                seed=config.seed,
            )
            return df, f"the synthetic tasks {config.data_dir!r}"
        hub_id = DATASET_REGISTRY[config.dataset]
        return load_hub_dataset(hub_id, config.data_dir), f"the Hub dataset {hub_id} (data_dir={config.data_dir})"

    def _load_rows(self) -> pd.DataFrame:
        """The rows a run evaluates, with a stable `row_id`, checked (columns, then every value) and sampled; the
        needle rows built. Needs at most the tokenizer, never the model."""
        config = self.config
        if query_aware_press(self.press) is not None and not config.query_aware:
            raise ValueError("FinchPress compresses with the question: run it with --query_aware.")
        df, source = self._load_raw_dataframe()
        needle = config.dataset == "needle_in_haystack"
        required = list(BASE_COLUMNS) + list(REQUIRED_COLUMNS.get(config.dataset, ()))
        if config.max_new_tokens is None and not needle:
            required.append("max_new_tokens")
        check_columns(df, required, source, config.dataset)
        if len(df) == 0:
            raise ValueError(f"{source} has no rows.")
        df = df.reset_index(drop=True)

        if config.fraction < 1:
            df = df.sample(frac=config.fraction, random_state=config.seed)
        if config.max_samples is not None:
            df = df.head(config.max_samples)
        check_rows(df, [column for column in required if column != "question"], source, config.dataset)
        if needle:
            from evaluation.benchmarks.needle_in_haystack.utils import insert_needle_in_haystack

            df = insert_needle_in_haystack(df, self._get_tokenizer(), config.max_context_length, config.needle_depth)
            if config.max_new_tokens is None and df["max_new_tokens"].isna().any():
                raise ValueError(f"Column 'max_new_tokens' is missing from {source}; or pass --max_new_tokens.")
        df = df.copy()
        df["row_id"] = df.index.astype(int)
        df = df.reset_index(drop=True)
        if "answer_prefix" not in df.columns:
            df["answer_prefix"] = ""
        df["answer_prefix"] = df["answer_prefix"].fillna("").astype(str)
        df["question"] = df["question"].fillna("").astype(str)
        return df

    def _finish_rows(self, df: pd.DataFrame) -> pd.DataFrame:
        """The rows as the pipeline gets them (FinchPress delimiter, question-aware contexts) and their fingerprints."""
        config = self.config
        df = df.copy()
        finch = query_aware_press(self.press)
        if finch is not None:
            finch.update_model_and_tokenizer(self.pipeline.model, self.pipeline.tokenizer)
            df["context"] = df["context"] + finch.delimiter_token
        if config.query_aware:
            df["context"] = df["context"] + df["question"]
            df["question"] = ""
        df["fingerprint"] = [
            row_fingerprint(c, q, p) for c, q, p in zip(df["context"], df["question"], df["answer_prefix"])
        ]
        return df

    def _load_and_prepare_dataset(self) -> pd.DataFrame:
        """Rows with a stable `row_id`, checked, sampled, and rewritten for the needle / query-aware modes."""
        return self._finish_rows(self._load_rows())

    def _check_metric(self, df: pd.DataFrame) -> None:
        """Score a placeholder answer on one row of each task, so that rows the metric cannot score (an unknown task,
        a malformed reference) fail now, before the model is loaded and before any file is touched."""
        dataset = self.config.dataset
        if dataset in METRICS_NOT_CHECKED:
            return
        sample = df.groupby("task", sort=False).head(1) if "task" in df.columns else df.head(1)
        sample = sample.copy()
        sample["predicted_answer"] = "placeholder"
        sample["compression_ratio"] = self.config.compression_ratio
        try:
            SCORER_REGISTRY[dataset](sample)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"The {dataset!r} metric cannot score these rows: {error}") from error

    # -- inference ------------------------------------------------------------------------------------------------
    def _groups(self, df: pd.DataFrame) -> list[list[int]]:
        """Row positions answered by one pipeline call: rows sharing a context (and answer prefix and length), or
        one row per call for decoding presses."""
        if is_decoding_press(self.press):
            return [[position] for position in range(len(df))]
        limits = df["max_new_tokens"] if "max_new_tokens" in df.columns else pd.Series([None] * len(df))
        keys = zip(df["context"], df["answer_prefix"], limits.astype(str))
        groups: dict[tuple, list[int]] = {}
        for position, key in enumerate(keys):
            groups.setdefault(key, []).append(position)
        return list(groups.values())

    def _max_new_tokens(self, row: pd.Series) -> int:
        if self.config.max_new_tokens is not None:
            return int(self.config.max_new_tokens)
        return int(row["max_new_tokens"])

    def _make_cache(self):
        if self.config.kv_cache == "dynamic":
            return None  # the pipeline creates a DynamicCache sized from the model config
        from transformers import QuantizedCache

        kwargs = {} if self.config.kv_cache_nbits is None else {"nbits": self.config.kv_cache_nbits}
        return QuantizedCache(backend=self.config.kv_cache_backend, config=self.pipeline.model.config, **kwargs)

    def _current_ratio(self) -> Optional[float]:
        if self.press is None:
            return 0.0
        try:
            ratio = getattr(self.press, "compression_ratio", None)
        except (AttributeError, ValueError, AssertionError):
            return None
        return float(ratio) if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else None

    def answer_group(self, rows: pd.DataFrame) -> list[str]:
        """Answers of rows sharing one context (one pipeline call; one per row for decoding presses)."""
        first = rows.iloc[0]
        common = dict(
            answer_prefix=first["answer_prefix"],
            press=self.press,
            max_new_tokens=self._max_new_tokens(first),
            max_context_length=self.config.max_context_length,
            cache=self._make_cache(),
        )
        if is_decoding_press(self.press):
            return [self.pipeline(first["context"], question=first["question"], **common)["answer"]]
        return self.pipeline(first["context"], questions=list(rows["question"]), **common)["answers"]

    def _run_inference(self, df: pd.DataFrame, partial: PartialResults) -> None:
        """Answer this process's shard of the groups, skipping rows answered by an earlier run."""
        from tqdm.auto import tqdm

        group = self.group
        done = partial.read()
        stale = [
            rid for rid, fp in zip(df["row_id"], df["fingerprint"]) if rid in done and done[rid]["fingerprint"] != fp
        ]
        if stale:
            raise ValueError(
                f"{len(stale)} saved predictions in {partial.directory} belong to different rows (the data changed "
                "since they were written). Pass --force to start over."
            )
        my_groups = shard(self._groups(df), group.rank, group.world_size)
        my_rows = sum(len(positions) for positions in my_groups)
        row_ids = [int(rid) for rid in df["row_id"]]
        is_done = [all(row_ids[p] in done for p in positions) for positions in my_groups]
        todo = [positions for positions, finished in zip(my_groups, is_done) if not finished]
        answered_positions = [p for positions, finished in zip(my_groups, is_done) if finished for p in positions]
        initial = len(answered_positions)
        if initial:
            logger.info("Resuming: %d of this process's %d rows were answered by an earlier run.", initial, my_rows)

        bar = tqdm(
            total=my_rows,
            initial=initial,
            desc=f"{self.config.press_name}@{self.config.ratio_tag()}"
            + (f" [rank {group.rank}]" if group.world_size > 1 else ""),
            position=group.rank,
            disable=not self.config.progress,
            dynamic_ncols=True,
        )
        predictions = {rid: done[rid]["predicted_answer"] for rid in row_ids if rid in done}
        last_score_time = 0.0
        with torch.inference_mode():
            for positions in todo:
                rows = df.iloc[positions]
                answers = self.answer_group(rows)
                ratio = self._current_ratio()
                records = [
                    {
                        "row_id": int(row_id),
                        "fingerprint": fingerprint,
                        "predicted_answer": answer,
                        "compression_ratio": ratio,
                    }
                    for row_id, fingerprint, answer in zip(rows["row_id"], rows["fingerprint"], answers)
                ]
                partial.append(group.rank, records)
                for record in records:
                    predictions[record["row_id"]] = record["predicted_answer"]
                answered_positions.extend(positions)
                bar.update(len(positions))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if time.time() - last_score_time > 1.0 or positions is todo[-1]:
                    score = self._running_score(df, answered_positions, predictions)
                    if score is not None:
                        bar.set_postfix(score=f"{score:.2f}")
                    last_score_time = time.time()
        bar.close()

    def _running_score(self, df: pd.DataFrame, positions: list[int], predictions: dict) -> Optional[float]:
        """The headline score of the rows answered so far (None when the metric cannot score a part of the data)."""
        if not positions:
            return None
        subset = df.iloc[sorted(positions)].copy()
        subset["predicted_answer"] = [predictions[int(rid)] for rid in subset["row_id"]]
        try:
            return headline_score(self.config.dataset, SCORER_REGISTRY[self.config.dataset](subset))
        except Exception as error:  # noqa: BLE001 - the progress bar must never stop a run
            logger.debug("No running score: %s", error)
            return None

    def _predictions_table(self, df: pd.DataFrame) -> pd.DataFrame:
        """Every column but the (long) context and the internal fingerprint, in a stable order."""
        columns = [
            c for c in df.columns if c not in ("context", "fingerprint", "predicted_answer", "compression_ratio")
        ]
        if is_decoding_press(self.press) and df["compression_ratio"].isna().all():
            return df[columns + ["predicted_answer"]]
        return df[columns + ["predicted_answer", "compression_ratio"]]


def wait_for_all_rows(partial: PartialResults, df: pd.DataFrame, world_size: int, poll_seconds: float = 2.0) -> dict:
    """The saved records once every row of `df` has one (other processes may still be answering their shards)."""
    row_ids = [int(row_id) for row_id in df["row_id"]]
    last_report = time.time()
    while True:
        records = partial.read()
        missing = sum(row_id not in records for row_id in row_ids)
        if missing == 0 or world_size == 1:
            return records
        if time.time() - last_report > 300:
            logger.info("Waiting for the other processes: %d of %d rows still unanswered.", missing, len(row_ids))
            last_report = time.time()
        time.sleep(poll_seconds)


def check_hub_model(model: str) -> None:
    """Raise a one-line FileNotFoundError when `model`, which is not a local directory, is not on the Hugging Face Hub
    or in its cache (offline, a typo, a private or gated repository), before anything long starts. Uses the Hub's own
    download code for one small file (`config.json`), which the model's loading needs anyway."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        hf_hub_download(repo_id=model, filename="config.json")
    except Exception as error:  # noqa: BLE001 - offline, unknown id, gated repo, bad id: all need the same hint
        if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
            return  # the repository is reachable but has no config.json: transformers decides what it can load
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise FileNotFoundError(
            f"The model {model!r} is neither a local directory nor reachable on the Hugging Face Hub "
            f"({type(error).__name__}: {reason}). Pass --model with a local copy: a directory saved with "
            f"save_pretrained, or one downloaded where there is network with `hf download {model} --local-dir DIR`."
        ) from error


def _read_json(path: Path):
    import json

    return json.loads(path.read_text())


def _read_yaml(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    return yaml.safe_load(path.read_text())


def main(config_file: Optional[str] = None, **overrides: Any) -> None:
    """Command line: `python evaluation/evaluate.py --dataset ruler --data_dir 4096 --model ... --press_name knorm
    --compression_ratio 0.5`. Every option of EvaluationConfig is a flag; `--config_file` picks another YAML.

    Bad options and missing inputs end the program with `Error: <what is wrong>` and exit status 1.
    """
    if overrides.pop("help", False) or overrides.pop("h", False):
        print(main.__doc__)
        return
    try:
        configs = load_configs(config_file, **overrides)
        if len(configs) > 1:
            for config in configs:  # every press and its options checked before the first run starts
                EvaluationRunner(copy.deepcopy(config))._setup_press()
        results = []
        for config in configs:
            metrics = EvaluationRunner(config).run_evaluation()
            results.append((config, metrics))
    except (ValueError, FileNotFoundError, RunLockedError) as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)
    if len(configs) > 1 and ProcessGroup.from_environment().is_main:
        print("\n" + comparison_table([(c.to_dict(), m, c.get_results_dir()) for c, m in results]))


main.__doc__ = f"{main.__doc__}\n    Options: {', '.join(f.name for f in fields(EvaluationConfig))}.\n"

if __name__ == "__main__":
    import fire

    fire.Fire(main)
