# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Where the reference model's training time goes: the data workers, or the training step (eager or compiled).

The one idea: time each side alone, in one run on one machine, on the batches the training really uses: the data
loader with N workers (batches per second, no model), and the training step on a fixed batch of each context length
(forward, backward and update). A run is data-bound where the loader makes fewer batches per second than the step
consumes, and host-bound where queueing a step's GPU work (the `host` column) takes about as long as the step itself.
Prints a table and writes JSON; the ratios to the eager step are the figures to report.

    python reference/bench_train.py --new_shapes 20 --output bench_train.json                  # on the GPU machine
    python reference/bench_train.py --new_shapes 20 --cudnn_attention --no_compile --output bench_train_cudnn.json
    python reference/bench_train.py --device cpu --tiny --lengths 200 --steps 2 --workers 0,1 --loader_seconds 2 \\
        --no_compile --output /tmp/b.json
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch
from torch.utils.data import DataLoader

from reference import write_report
from reference.train import (
    TaskBatches,
    build_model,
    make_batch,
    make_optimizer,
    make_train_step,
    parse_args,
    synchronize,
)


def time_loader(train_args: argparse.Namespace, workers: int, seconds: float, start: int) -> dict:
    """Batches per second the data loader delivers with `workers` processes (after its first batch)."""
    train_args.workers = workers
    loader = DataLoader(
        TaskBatches(train_args, start),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=8 if workers > 0 else None,
    )
    iterator = iter(loader)
    next(iterator)
    begin, count, tokens = time.time(), 0, 0
    while time.time() - begin < seconds:
        batch = next(iterator)
        count += 1
        tokens += batch["input_ids"].numel()
    elapsed = time.time() - begin
    del iterator
    return {"workers": workers, "batches_per_s": count / elapsed, "tokens_per_s": tokens / elapsed}


def _step_inputs(batch: dict, device: str) -> list[torch.Tensor]:
    """The tensors a training step takes from a batch, on `device`."""
    return [batch[key].to(device) for key in ("input_ids", "answer_mask", "context_mask")]


def time_steps(
    train_args: argparse.Namespace, tokenizer, device: str, length: int, steps: int, compile: bool, new_shapes: int = 0
) -> dict:
    """Seconds per training step on a real training batch whose longest context has `length` tokens, and, with
    `new_shapes`, per step on that many batches of other shapes (training meets a new shape at almost every step)."""
    train_args.compile = compile
    model = build_model(train_args, tokenizer).to(device).train()
    optimizer = make_optimizer(model, train_args, device)
    step = make_train_step(model, optimizer, train_args, device)
    train_args.start_context_length = train_args.context_length = length
    train_args.curriculum_steps = train_args.early_steps = 0
    batch = make_batch(20_000, train_args, tokenizer)
    tensors = _step_inputs(batch, device)
    began = time.time()
    step(*tensors, 1e-4)  # the first step compiles
    synchronize(device)
    first = time.time() - began
    step(*tensors, 1e-4)
    synchronize(device)
    began, host = time.time(), 0.0
    for _ in range(steps):
        called = time.time()
        step(*tensors, 1e-4)
        host += time.time() - called  # until the step's work is queued (CUDA runs it asynchronously)
    synchronize(device)
    per_step = (time.time() - began) / steps
    tokens = tensors[0].numel()
    new_shape_s = None
    if new_shapes:
        others = [_step_inputs(make_batch(20_001 + i, train_args, tokenizer), device) for i in range(new_shapes)]
        synchronize(device)
        began = time.time()
        for other in others:
            step(*other, 1e-4)
        synchronize(device)
        new_shape_s = (time.time() - began) / new_shapes
    return {
        "length": length,
        "compiled": compile,
        "batch_shape": list(tensors[0].shape),
        "first_step_s": first,
        "step_s": per_step,
        "host_s": host / steps,
        "tokens_per_s": tokens / per_step,
        "new_shape_step_s": new_shape_s,
    }


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench_train.json")
    parser.add_argument("--device", default=None)
    parser.add_argument("--lengths", default="256,512,1024", help="context lengths of the timed steps")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per length")
    parser.add_argument("--workers", default="4,14", help="data-loader worker counts to time")
    parser.add_argument("--loader_seconds", type=float, default=20.0)
    parser.add_argument("--no_compile", action="store_true", help="time the eager step only")
    parser.add_argument("--tiny", action="store_true", help="the tiny model of train.py --tiny (smoke tests)")
    parser.add_argument("--cudnn_attention", action="store_true", help="keep the cuDNN attention backend on")
    parser.add_argument("--new_shapes", type=int, default=0, help="also time N steps on batches of N new shapes")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lengths = [int(part) for part in args.lengths.split(",") if part]
    if not lengths or min(lengths) < 160:
        raise SystemExit(f"--lengths must be context lengths of at least 160 tokens, got {args.lengths!r}")
    train_argv = ["--output_dir", "unused", "--device", device, "--early_steps", "0"]
    train_argv += (["--tiny"] if args.tiny else []) + (["--cudnn_attention"] if args.cudnn_attention else [])
    from transformers import AutoTokenizer

    base = parse_args(train_argv)
    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    loader = [
        time_loader(parse_args(train_argv), int(w), args.loader_seconds, start=20_000)
        for w in args.workers.split(",")
        if w
    ]
    steps = []
    for length in lengths:
        for compile in (False,) if args.no_compile else (False, True):
            row = time_steps(parse_args(train_argv), tokenizer, device, length, args.steps, compile, args.new_shapes)
            steps.append(row)
    eager = {row["length"]: row["step_s"] for row in steps if not row["compiled"]}
    for row in steps:
        row["speedup_vs_eager"] = eager[row["length"]] / row["step_s"]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"device: {name}; tokens per batch {base.tokens_per_batch}")
    print("| data workers | batches/s | tokens/s |\n|---|---|---|")
    for row in loader:
        print(f"| {row['workers']} | {row['batches_per_s']:.1f} | {row['tokens_per_s'] / 1e3:.0f} k |")
    attention = "cuDNN attention (CUDA only) " + ("on" if args.cudnn_attention else "off")
    print(f"\n{attention}; 'new shapes': ms per step over {args.new_shapes} batches of other shapes")
    print("| context | step | first step (s) | step (ms) | host (ms) | new shapes (ms) | tokens/s | x eager |")
    print("|---|---|---|---|---|---|---|---|")
    for row in steps:
        kind = "compiled" if row["compiled"] else "eager"
        new = row["new_shape_step_s"]
        print(
            f"| {row['length']} | {kind} | {row['first_step_s']:.1f} | {1000 * row['step_s']:.1f} | "
            f"{1000 * row['host_s']:.1f} | {'-' if new is None else f'{1000 * new:.1f}'} | "
            f"{row['tokens_per_s'] / 1e3:.0f} k | {row['speedup_vs_eager']:.2f} |"
        )
    result = {
        "device": name,
        "tokens_per_batch": base.tokens_per_batch,
        "cudnn_attention": args.cudnn_attention,
        "loader": loader,
        "steps": steps,
    }
    write_report(args.output, result)
    return result


if __name__ == "__main__":
    main()
