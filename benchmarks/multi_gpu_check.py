# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Tokens of a model split over the GPUs (`device_map="auto"`) against the same model on one device, one press of
each family, through the pipeline and through `with press(model): model.generate(...)`.

    python benchmarks/multi_gpu_check.py --model Qwen/Qwen3-8B --output multi_gpu_check.json

Runs on any number of GPUs (one GPU: `auto` puts every layer on it, so the check is trivial but the code paths run)
and on CPU (`--device_map '{"": "cpu"}' --reference_device cpu`, what the tests do). Greedy decoding, so the split
model must produce exactly the reference's tokens; the table says where they differ. Exits with status 1 when a case
differs or fails, after printing the table and writing the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from harness.reference_model import REFERENCE_MODEL_DIR
from kvpress import (
    AdaKVPress,
    ChunkPress,
    KeyRerotationPress,
    KnormPress,
    KVzipPress,
)

CONTEXT = (
    "The archive holds letters from three families. The Hallers wrote about their orchard and the winter of the great "
    "frost. The Moreau letters describe a bakery near the harbour and a lighthouse keeper named Odile. The Brandt "
    "family kept a ledger of every ship that left the port, with its cargo and the name of its captain. "
)
QUESTION = "Who was the lighthouse keeper?"

# name -> (family, press factory, pipeline options, also run with model.generate)
CASES: dict[str, tuple[str, Callable[[], Any], dict, bool]] = {
    "knorm": ("scorer", lambda: KnormPress(compression_ratio=0.5), {}, True),
    "chunk(knorm)": ("wrapper", lambda: ChunkPress(KnormPress(compression_ratio=0.5), chunk_length=32), {}, True),
    "adakv(knorm)": ("head-wise", lambda: AdaKVPress(KnormPress(compression_ratio=0.5)), {}, True),
    "knorm budget 48": ("decoding budget", lambda: KnormPress(cache_budget=48), {}, True),
    "kvzip": ("repeat pass", lambda: KVzipPress(compression_ratio=0.5), {}, False),
    "rerotation(knorm)": ("re-rotation", lambda: KeyRerotationPress(KnormPress(compression_ratio=0.5)), {}, True),
    "knorm chunk 32": ("chunked prefill", lambda: KnormPress(compression_ratio=0.5), {"prefill_chunk_size": 32}, False),
    "adakv ragged": (
        "ragged cache",
        lambda: AdaKVPress(KnormPress(compression_ratio=0.5)),
        {"ragged_cache": True},
        False,
    ),
}


def load(model: str, device_map: Any, dtype: str):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), device_map=device_map)
    return loaded.eval()


def devices(model) -> list[str]:
    return sorted({str(parameter.device) for parameter in model.parameters()})


def pipeline_tokens(pipe, press, options: dict, max_new_tokens: int) -> list[int]:
    answer = pipe(CONTEXT * 3, question=QUESTION, press=press, max_new_tokens=max_new_tokens, **options)["answer"]
    return pipe.tokenizer.encode(answer, add_special_tokens=False)


def generate_tokens(model, tokenizer, press, max_new_tokens: int) -> list[int]:
    ids = tokenizer(CONTEXT * 3 + QUESTION, return_tensors="pt").input_ids.to(model.device)
    with torch.inference_mode(), press(model):
        output = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return output[0, ids.shape[1] :].tolist()


def run_case(name: str, reference, split, tokenizer, max_new_tokens: int) -> list[dict]:
    from transformers import pipeline

    family, make_press, options, with_generate = CASES[name]
    rows = []
    pipes = {}
    for model in (reference, split):
        pipes[id(model)] = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    paths: list[tuple[str, Callable[[Any, Any], list[int]]]] = [
        ("pipeline", lambda model, press: pipeline_tokens(pipes[id(model)], press, options, max_new_tokens))
    ]
    if with_generate:
        paths.append(("generate", lambda model, press: generate_tokens(model, tokenizer, press, max_new_tokens)))
    for path, produce in paths:
        row: dict = {"case": name, "family": family, "path": path}
        try:
            started = time.perf_counter()
            expected = produce(reference, make_press())
            middle = time.perf_counter()
            got = produce(split, make_press())
            row.update(
                reference_tokens=expected,
                split_tokens=got,
                identical=expected == got,
                first_difference=first_difference(expected, got),
                reference_seconds=middle - started,
                split_seconds=time.perf_counter() - middle,
            )
        except Exception as error:  # noqa: BLE001 - one failing case is reported, the others still run
            row.update(identical=False, error=f"{type(error).__name__}: {error}")
        rows.append(row)
    return rows


def first_difference(a: list[int], b: list[int]) -> Optional[int]:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def table(rows: list[dict]) -> str:
    lines = [f"{'case':<20} {'family':<16} {'path':<9} {'tokens':>6} {'identical':<9} note", "-" * 80]
    for row in rows:
        note = row.get("error") or ("" if row["identical"] else f"first difference at token {row['first_difference']}")
        count = len(row.get("reference_tokens", []))
        lines.append(
            f"{row['case']:<20} {row['family']:<16} {row['path']:<9} {count:>6} {str(row['identical']):<9} {note}"
        )
    return "\n".join(lines)


def parse_device_map(text: str) -> Any:
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--device_map {text!r} is neither auto/balanced/sequential nor a JSON object") from error
    if not isinstance(value, dict):
        raise ValueError(f"--device_map {text!r} must be a JSON object (module name -> device), got {type(value)}")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REFERENCE_MODEL_DIR), help="Hub id or local path")
    parser.add_argument("--device_map", default="auto", help='auto, or a JSON object such as \'{"": "cpu"}\'')
    parser.add_argument("--reference_device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, among: {', '.join(CASES)}")
    parser.add_argument("--output", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    device_map = parse_device_map(args.device_map)
    cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in cases if name not in CASES]
    if unknown:
        raise ValueError(f"unknown --cases {unknown}; allowed: {', '.join(CASES)}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be a positive integer, got {args.max_new_tokens}")

    from transformers import AutoTokenizer

    import kvpress  # noqa: F401  (registers the pipeline)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    reference = load(args.model, {"": args.reference_device}, args.dtype)
    split = load(args.model, device_map, args.dtype)
    rows = [row for name in cases for row in run_case(name, reference, split, tokenizer, args.max_new_tokens)]
    result = {
        "model": args.model,
        "device_map": device_map,
        "split_devices": devices(split),
        "reference_device": args.reference_device,
        "dtype": args.dtype,
        "gpus": torch.cuda.device_count(),
        "rows": rows,
    }
    print(f"split model on {', '.join(result['split_devices'])}; reference on {args.reference_device}")
    print(table(rows))
    print(json.dumps({key: value for key, value in result.items() if key != "rows"}))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0 if all(row["identical"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
