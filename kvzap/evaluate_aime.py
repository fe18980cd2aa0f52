# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Evaluate a KVzap surrogate while the model generates: AIME 2025 (upstream's job) or any harness dataset.

    python kvzap/evaluate_aime.py mlp --threshold -4 --model_name Qwen/Qwen3-8B            # alessiodevoto/aime25
    python kvzap/evaluate_aime.py linear --threshold -5 --model_name reference/model --kvzap_model_path out \\
        --data_path problems.jsonl --device cpu --max_new_tokens 64                         # local rows, offline
    python kvzap/evaluate_aime.py dataset mlp --threshold -5 --model_name reference/model --kvzap_model_path out \\
        --dataset synthetic --rows_per_task 5 --device cpu                                  # pipeline, harness metric

The one idea: `DMSPress(KVzapPress(model_type), threshold, decoding=True)` evicts every token whose predicted log
KVzip+ score is below `threshold` once it leaves the sliding window, during prefill and during sampling-based
generation (`model.generate`, temperature 0.6, top-p 0.95, top-k 20); `no_press` is the full cache. Each run writes
`predictions.csv` and `metrics.json` (the dataset's metric and the achieved compression ratio) to its own directory
under `output_dir`. The `dataset` command runs the kvpress pipeline (question-agnostic compression of each context)
over a harness dataset (Hub, `--data_path`, or the synthetic tasks) and scores it with the harness's metric.
"""

from __future__ import annotations

import logging
import sys
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
from tqdm.auto import tqdm

from kvpress.presses.dms_press import DMSPress
from kvpress.presses.kvzap_press import KVZAP_MODEL_TYPES, KVzapPress
from kvzap.shared import (
    DATASET_REGISTRY,
    SCORER_REGISTRY,
    TRAINED_CONTEXT_LENGTH,
    aime25_metrics,
    load_hub_dataset,
    load_local_dataset,
    load_synthetic,
    write_report,
)
from kvzap.train import resolve_device, resolve_model_name

logger = logging.getLogger("kvzap.evaluate")

AIME_DATASET = "alessiodevoto/aime25"
PRESS_TYPES = ("no_press",) + KVZAP_MODEL_TYPES
SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}


def build_press(
    kvzap_model_type: str,
    threshold: float,
    kvzap_model_path: Optional[str] = None,
    decoding: bool = True,
    sliding_window_size: int = 128,
) -> Optional[DMSPress]:
    """None for `no_press`, else `DMSPress(KVzapPress(kvzap_model_type, kvzap_model_path), threshold)`."""
    if kvzap_model_type not in PRESS_TYPES:
        raise ValueError(f"kvzap_model_type must be one of {PRESS_TYPES}, got {kvzap_model_type!r}.")
    if kvzap_model_type == "no_press":
        return None
    scorer = KVzapPress(model_type=kvzap_model_type, kvzap_model_path=kvzap_model_path)
    return DMSPress(scorer, threshold=threshold, sliding_window_size=sliding_window_size, decoding=decoding)


def load_model(model_name: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_name(model_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def chat_prompt(tokenizer, question: str) -> str:
    """The user turn with the generation prompt; without a chat template, BOS + question + newline (as the
    pipeline)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return (tokenizer.bos_token or "") + question + "\n"
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def load_problems(data_path: Optional[str]) -> pd.DataFrame:
    """AIME problems: `question` (or `problem`) and `answer` columns, from `data_path` or the Hub."""
    df = load_local_dataset(data_path) if data_path else load_hub_dataset(AIME_DATASET, None)
    if "question" not in df.columns and "problem" in df.columns:
        df = df.rename(columns={"problem": "question"})
    missing = [column for column in ("question", "answer") if column not in df.columns]
    if missing:
        raise ValueError(f"The problems lack the columns {missing} (found {list(df.columns)}): need question, answer.")
    return df


def _run_dir(output_dir: str, task: str, model_name: str, kvzap_model_type: str, threshold: float) -> Path:
    path = resolve_model_name(model_name)  # a local model is named by its folder, a Hub id as org--name
    tag = f"{task}__{Path(path).name if Path(path).exists() else model_name.replace('/', '--')}"
    directory = Path(output_dir) / f"{tag}__kvzap_{kvzap_model_type}__{threshold:.2f}" / uuid.uuid4().hex
    directory.mkdir(parents=True, exist_ok=False)
    return directory


def evaluate(
    kvzap_model_type: str,
    threshold: float = 0.0,
    model_name: str = "Qwen/Qwen3-8B",
    device: Optional[str] = "cuda:0",
    max_new_tokens: int = 32000,
    data_path: Optional[str] = None,
    kvzap_model_path: Optional[str] = None,
    output_dir: str = "results",
    max_rows: Optional[int] = None,
    seed: int = 0,
) -> dict:
    """AIME 2025 with sampling-based generation under `DMSPress(KVzapPress(...), threshold, decoding=True)`.

    kvzap_model_type: "no_press", "linear" or "mlp". data_path: local problems (.jsonl/.parquet with question and
    answer) instead of the Hub's alessiodevoto/aime25. kvzap_model_path: a local KVzap model (kvzap/train.py's
    output_dir); None loads nvidia/KVzap-{type}-{model name} from the Hub."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    press = build_press(kvzap_model_type, float(threshold), kvzap_model_path, decoding=True)
    df = load_problems(data_path)
    if max_rows is not None:
        df = df.head(int(max_rows))
    device = resolve_device(device)
    model, tokenizer = load_model(model_name, device)
    torch.manual_seed(seed)
    predictions, ratios = [], []
    for question in tqdm(list(df["question"]), desc="AIME problems"):
        inputs = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt", add_special_tokens=False)
        with press(model) if press is not None else nullcontext(), torch.no_grad():
            output = model.generate(
                **inputs.to(device), max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **SAMPLING
            )
        predictions.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False))
        ratios.append(0.0 if press is None else float(press.compression_ratio))
    df = df.assign(predicted_answer=predictions, compression_ratio=ratios)
    metrics = {**aime25_metrics(df), "compression_ratio": float(sum(ratios) / max(len(ratios), 1))}
    directory = _run_dir(output_dir, "aime25", model_name, kvzap_model_type, float(threshold))
    df.to_csv(directory / "predictions.csv", index=False)
    write_report(directory / "metrics.json", metrics)
    logger.info("%s: %s", directory, metrics)
    return {"output": str(directory), **metrics}


def evaluate_dataset(
    kvzap_model_type: str,
    threshold: float = 0.0,
    model_name: str = "reference/model",
    dataset: str = "synthetic",
    data_dir: Optional[str] = None,
    data_path: Optional[str] = None,
    kvzap_model_path: Optional[str] = None,
    device: Optional[str] = None,
    rows_per_task: int = 5,
    context_length: int = TRAINED_CONTEXT_LENGTH,
    seed: int = 0,
    max_rows: Optional[int] = None,
    output_dir: str = "results",
) -> dict:
    """A harness dataset through the pipeline with `DMSPress(KVzapPress(...), threshold)` on each context (prefill
    only), scored by the dataset's metric. `dataset="synthetic"` generates `rows_per_task` rows of every task of
    `context_length` tokens (`data_dir` names tasks, comma-separated); `data_path` reads local rows."""
    import kvpress  # noqa: F401  (registers the pipeline task)
    from kvpress.pipeline import KVPressTextGenerationPipeline

    if dataset not in DATASET_REGISTRY:
        raise ValueError(f"dataset must be one of {sorted(DATASET_REGISTRY)}, got {dataset!r}.")
    press = build_press(kvzap_model_type, float(threshold), kvzap_model_path, decoding=False)
    device = resolve_device(device)
    model, tokenizer = load_model(model_name, device)
    if data_path:
        df = load_local_dataset(data_path)
    elif dataset == "synthetic":
        df = load_synthetic(data_dir or "all", int(rows_per_task), [int(context_length)], tokenizer, int(seed))
    else:
        df = load_hub_dataset(DATASET_REGISTRY[dataset], data_dir)
    if max_rows is not None:
        df = df.head(int(max_rows))
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device=model.device)
    predictions, ratios = [], []
    for _, row in tqdm(df.iterrows(), total=len(df), desc=f"{dataset} rows"):
        output = pipe(
            row["context"],
            question=row["question"],
            answer_prefix=row.get("answer_prefix", "") or "",
            press=press,
            max_new_tokens=int(row.get("max_new_tokens", 32) or 32),
        )
        predictions.append(output["answer"])
        ratios.append(0.0 if press is None else float(press.compression_ratio))
    df = df.assign(predicted_answer=predictions, compression_ratio=ratios)
    metrics = {"metric": SCORER_REGISTRY[dataset](df), "compression_ratio": float(sum(ratios) / max(len(ratios), 1))}
    directory = _run_dir(output_dir, dataset, model_name, kvzap_model_type, float(threshold))
    df.to_csv(directory / "predictions.csv", index=False)
    write_report(directory / "metrics.json", metrics)
    logger.info("%s: %s", directory, metrics)
    return {"output": str(directory), **metrics}


def main(argv: Optional[list[str]] = None) -> None:
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "dataset":
        fire.Fire(evaluate_dataset, command=argv[1:], serialize=lambda result: None)
    else:
        fire.Fire(evaluate, command=argv, serialize=lambda result: None)


if __name__ == "__main__":
    main()
