# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""`python reason/evaluate.py`: accuracy and trace length of a model on a reasoning dataset under a KV-cache budget.

With no arguments it runs the offline default: the synthetic variable-tracking task with the shipped reference
model, on CPU. The fork's flags keep their names (`--dataset`, `--model`/`--model_name`, `--press_name`,
`--cache_budget`, `--max_new_tokens`, `--num_samples`/`--fraction`, ...); see reason/README.md. Each run writes
`predictions.jsonl` (as it goes), `metrics.json` and `config.yaml` to `<output_dir>/<run name>/`; a rerun of a
finished run prints its table (`--skip_existing`), an interrupted one continues where it stopped (`--resume`).
Data parallel: `accelerate launch --num_processes N reason/evaluate.py ...`.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch
import yaml

from reason import generation, records
from reason.benchmarks import get_benchmark
from reason.loading import load_rows, select_rows
from reason.presses import EAGER_PRESSES, compresses, make_press
from reason.shared import (
    REFERENCE_MODEL_DIR,
    ProcessGroup,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    check_inside,
    data_fingerprint,
    wait_until_complete,
)
from reason.telemetry import SampleTelemetry

logger = logging.getLogger("reason.evaluate")

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SYNTHETIC_SAMPLES = 10
# Settings that name and define a run (saved in config.yaml; a rerun with other values is another run).
RUN_SETTINGS = (
    "dataset",
    "data_path",
    "data_split",
    "model",
    "press_name",
    "cache_budget",
    "max_new_tokens",
    "num_samples",
    "fraction",
    "random_seed",
    "max_context_length",
    "do_sampling",
    "temperature",
    "top_p",
    "repetition_penalty",
    "chat_template",
    "attn_implementation",
)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(settings: dict) -> None:
    """Every setting's type and range, before anything is loaded."""
    get_benchmark(settings["dataset"])
    make_press(settings["press_name"], settings["cache_budget"])  # the press checks its own fields (on the CPU)
    budget = settings["cache_budget"]
    if settings["press_name"] == "full" and budget:
        logger.info("press full keeps the whole cache; cache_budget=%s only names the run.", budget)
    if settings["press_name"] != "full" and budget == 0:
        logger.warning("cache_budget=0: press %s evicts nothing.", settings["press_name"])
    max_new = settings["max_new_tokens"]
    _check(
        max_new is None or (_is_int(max_new) and max_new > 0),
        f"max_new_tokens must be a positive integer or None, got {max_new!r}.",
    )
    _check(_is_int(settings["random_seed"]), f"random_seed must be an integer, got {settings['random_seed']!r}.")
    _check(
        _is_int(settings["batch_size"]) and settings["batch_size"] >= 1,
        f"batch_size must be a positive integer, got {settings['batch_size']!r}.",
    )
    _check(
        isinstance(settings["do_sampling"], bool),
        f"do_sampling must be True or False, got {settings['do_sampling']!r}.",
    )
    _check(isinstance(settings["latency"], bool), f"latency must be True or False, got {settings['latency']!r}.")
    for name in ("resume", "skip_existing"):
        _check(isinstance(settings[name], bool), f"{name} must be True or False, got {settings[name]!r}.")
    _check(settings["temperature"] > 0, f"temperature must be > 0, got {settings['temperature']!r}.")
    _check(0 < settings["top_p"] <= 1, f"top_p must be in (0, 1], got {settings['top_p']!r}.")
    _check(
        settings["chat_template"] in generation.CHAT_TEMPLATE_MODES,
        f"chat_template must be auto, True or False, got {settings['chat_template']!r}.",
    )
    if settings["batch_size"] > 1:
        _check(
            not compresses(settings["press_name"], budget),
            f"batch_size={settings['batch_size']} with press {settings['press_name']} at cache_budget={budget}: the "
            "presses would score the padding of shorter prompts as cache entries. Use batch_size 1 with a "
            "compressing press (and data parallelism, accelerate launch, for speed); batches work with press full.",
        )


def resolve_model(model: Optional[str], model_name: Optional[str]) -> str:
    """`--model` and `--model_name` are the same flag (the fork's README used one, its code the other)."""
    if model is not None and model_name is not None and str(model) != str(model_name):
        raise ValueError(f"--model {model!r} and --model_name {model_name!r} disagree; pass one of them.")
    chosen = model if model is not None else model_name
    if chosen is None:
        return str(REFERENCE_MODEL_DIR)
    local = Path(str(chosen)).expanduser()
    return str(local.resolve()) if local.exists() else str(chosen)


def _device(device: Optional[str], group: ProcessGroup) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{group.local_rank}")
    return torch.device("cpu")


def _load_model(settings: dict, device: torch.device):
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": "auto"}
    attn = settings["attn_implementation"]
    if attn is None and settings["press_name"] in EAGER_PRESSES:
        attn = "eager"
    if attn is not None:
        kwargs["attn_implementation"] = attn
    model = AutoModelForCausalLM.from_pretrained(settings["model"], **kwargs)
    return model.to(device).eval()


def _fingerprint(selected: list[tuple[int, dict]]) -> str:
    frame = pd.DataFrame(
        {
            "row_index": [index for index, _ in selected],
            "row": [json.dumps(row, sort_keys=True, default=str, ensure_ascii=False) for _, row in selected],
        }
    )
    return data_fingerprint(frame)


def _max_new_tokens(settings: dict, model, prompt_length: int) -> int:
    """--max_new_tokens, or (None) what fits in the model's context after this prompt (the fork computed it from the
    first prompt and reused it for every sample)."""
    if settings["max_new_tokens"] is not None:
        return settings["max_new_tokens"]
    limit = getattr(model.config, "max_position_embeddings", None) or 16 * 1024
    if prompt_length >= limit:
        raise ValueError(f"A prompt of {prompt_length} tokens leaves no room in the model's {limit}-token context.")
    return limit - prompt_length


def _answer(benchmark, settings, model, tokenizer, press, telemetry, items) -> list[dict]:
    """Records of a batch of (sample_id, row_index, row)."""
    prompts = [benchmark.format_prompt(row) for _, _, row in items]
    ids = [
        generation.prompt_ids(tokenizer, prompt, settings["chat_template"], settings["max_context_length"])
        for prompt in prompts
    ]
    if settings["do_sampling"]:
        torch.manual_seed(settings["random_seed"] + items[0][0])
    telemetry.start()
    outputs = generation.generate_response(
        model,
        tokenizer,
        ids,
        press,
        max_new_tokens=_max_new_tokens(settings, model, max(len(prompt_ids) for prompt_ids in ids)),
        do_sampling=settings["do_sampling"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        repetition_penalty=settings["repetition_penalty"],
    )
    stats = telemetry.stop(sum(len(out["output_ids"]) for out in outputs))
    batch = []
    for (sample_id, row_index, row), prompt, prompt_ids, out in zip(items, prompts, ids, outputs):
        extracted = benchmark.extract(out["response"])
        gold = benchmark.gold_answer(row)
        scores = benchmark.score(extracted, gold)
        output_count = len(out["output_ids"])
        uncompressed = len(prompt_ids) + output_count - 1  # the last token is never written to the cache
        batch.append(
            {
                "sample_id": sample_id,
                "row_index": row_index,
                "row": row,
                "prompt": prompt,
                "response": out["response"],
                "extracted_answer": extracted,
                "gold_answer": gold,
                "correct": scores["correct"],
                "scores": scores,
                "stop_reason": out["stop_reason"],
                "input_token_count": len(prompt_ids),
                "output_token_count": output_count,
                "total_token_count": len(prompt_ids) + output_count,
                "cache_budget": settings["cache_budget"],
                "kept_cache_mean": out["kept_cache_mean"],
                "kept_cache_max": out["kept_cache_max"],
                "compression_ratio": out["kept_cache_mean"] / uncompressed if uncompressed > 0 else 1.0,
                "batch_size": len(items),
                **stats,  # of the whole batch
            }
        )
    return batch


def _rescore(benchmark, record: dict) -> dict:
    """A stored record with its answer extracted and scored again (a fixed extractor applies to old responses)."""
    extracted = benchmark.extract(record["response"])
    gold = benchmark.gold_answer(record["row"])
    scores = benchmark.score(extracted, gold)
    return {
        **record,
        "extracted_answer": extracted,
        "gold_answer": gold,
        "correct": scores["correct"],
        "scores": scores,
    }


def _read_yaml(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def evaluate(
    dataset: str = "synthetic",
    model: Optional[str] = None,
    model_name: Optional[str] = None,
    press_name: str = "h2o",
    cache_budget: int = 256,
    max_new_tokens: Optional[int] = 2048,
    num_samples: int = 0,
    fraction: float = 1.0,
    random_seed: int = 42,
    max_context_length: Optional[int] = None,
    device: Optional[str] = None,
    do_sampling: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    repetition_penalty: float = 1.2,
    latency: bool = True,
    resume: bool = True,
    skip_existing: bool = True,
    output_dir: Optional[str] = None,
    data_path: Optional[str] = None,
    data_split: Optional[str] = None,
    batch_size: int = 1,
    chat_template: Any = "auto",
    attn_implementation: Optional[str] = None,
    progress: bool = True,
) -> Optional[dict]:
    """Run one (dataset, model, press, budget) setting; returns its metrics (None on a process that is not the
    main one of a data-parallel run). See reason/README.md for every flag."""
    settings = dict(locals())
    settings["model"] = resolve_model(model, model_name)
    del settings["model_name"]
    if isinstance(chat_template, str) and chat_template.lower() in ("true", "false"):
        settings["chat_template"] = chat_template.lower() == "true"
    if data_path is not None:
        settings["data_path"] = str(Path(data_path).expanduser().resolve())
    check_settings(settings)
    benchmark = get_benchmark(dataset)
    group = ProcessGroup.from_environment()
    out_root = Path(output_dir).expanduser() if output_dir is not None else DEFAULT_OUTPUT_DIR
    out_root.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    n_generated = num_samples or DEFAULT_SYNTHETIC_SAMPLES
    rows, source = load_rows(benchmark, settings["data_path"], data_split, n_generated, random_seed, tokenizer)
    selected = select_rows(rows, num_samples, fraction, random_seed)
    fingerprint = _fingerprint(selected)

    run_dir = check_inside(out_root / records.run_name(settings), out_root)
    config = {key: settings[key] for key in RUN_SETTINGS}
    config.update(hub_id=benchmark.hub_id, source=source, num_rows=len(selected), data_fingerprint=fingerprint)
    log = records.PredictionLog(run_dir, group.rank, group.world_size)
    summary = {key: settings[key] for key in ("dataset", "press_name", "cache_budget")}

    with RunLock(run_dir / f".lock.rank{group.rank}"):
        saved = _read_yaml(run_dir / "config.yaml")
        same_data = saved is not None and saved.get("data_fingerprint") == fingerprint
        metrics_path = run_dir / "metrics.json"
        if skip_existing and same_data and metrics_path.exists():
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            logger.info("%s is finished (--skip_existing True): not run again.", run_dir)
            return {**summary, "metrics": metrics, "run_dir": str(run_dir)} if group.is_main else None
        done = log.read() if resume else {}
        if done and not same_data:
            raise ValueError(
                f"{run_dir} holds {len(done)} predictions of other data (data fingerprint "
                f"{None if saved is None else saved.get('data_fingerprint')}, now {fingerprint}); pass --resume False "
                "to start over (they are moved aside, not deleted) or another --output_dir."
            )
        if not resume and group.is_main:
            log.set_aside()
        if group.is_main:
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        group.wait()

        mine = [
            (sample_id, row_index, row)
            for sample_id, (row_index, row) in enumerate(selected)
            if sample_id % group.world_size == group.rank
        ]
        pending = [item for item in mine if item[0] not in done]
        if done:
            logger.info("Resuming %s: %d of %d samples already answered.", run_dir, len(mine) - len(pending), len(mine))
        if pending:
            _run(benchmark, settings, tokenizer, pending, done, mine, log, group)
        if not group.is_main:
            return None
        # Launched processes (a real group): wait for the other shards' answers on disk, not at a barrier, which
        # would time out while a slower shard still generates. A group without a barrier does not wait.
        if group.world_size > 1 and group.barrier is not None:
            wait_until_complete(lambda: _count_missing(log, len(selected)), len(selected))
        answered = log.read()
        missing = [i for i in range(len(selected)) if i not in answered]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {len(selected)} samples have no prediction in {run_dir} (first: {missing[:10]}); "
                "a process did not finish. Run the same command again to complete them."
            )
        answered = {key: _rescore(benchmark, record) for key, record in answered.items()}
        log.merge(answered)
        score_keys = next(iter(answered.values()))["scores"].keys()
        metrics = {**config, **records.compute_metrics([answered[i] for i in sorted(answered)], score_keys)}
        atomic_write_json(metrics_path, metrics)
    return {**summary, "metrics": metrics, "run_dir": str(run_dir)}


def _count_missing(log: records.PredictionLog, count: int) -> int:
    answered = log.read()
    return sum(sample_id not in answered for sample_id in range(count))


def _run(benchmark, settings, tokenizer, pending, done, mine, log, group) -> None:
    from tqdm.auto import tqdm

    device = _device(settings["device"], group)
    random.seed(settings["random_seed"])
    model = _load_model(settings, device)
    press = make_press(settings["press_name"], settings["cache_budget"], seed=settings["random_seed"])
    telemetry = SampleTelemetry(press, device, latency=settings["latency"])
    answered = [done[sample_id]["correct"] for sample_id, _, _ in mine if sample_id in done]
    bar = tqdm(
        total=len(mine),
        initial=len(answered),
        desc=f"{settings['dataset']} {settings['press_name']}",
        disable=not settings["progress"] or not group.is_main,
        dynamic_ncols=True,
    )

    def on_tokens(prefill_tokens, decoding_tokens, phase, label):
        bar.set_postfix_str(f"acc={_accuracy(answered)} dec={decoding_tokens}", refresh=False)

    press.progress_update = on_tokens
    try:
        size = settings["batch_size"]
        for start in range(0, len(pending), size):
            for record in _answer(
                benchmark, settings, model, tokenizer, press, telemetry, pending[start : start + size]
            ):
                log.append(record)
                answered.append(record["correct"])
                bar.set_postfix_str(f"acc={_accuracy(answered)}")
                bar.update(1)
    finally:
        bar.close()


def _accuracy(values: list) -> str:
    return f"{100 * sum(values) / len(values):.1f}" if values else "-"


def main(**flags: Any) -> None:
    """Run `evaluate` with the command line's flags and print its score table."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")
    result = evaluate(**flags)
    if result is not None:
        print(records.score_table([result]))
        print(f"results: {result['run_dir']}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
