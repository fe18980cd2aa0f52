# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Time greedy decoding with a growing KV cache, with PyTorch's cuDNN attention backend on and off.

    python reference/bench_decode.py [--model_dir DIR] [--dtype bfloat16] [--new_tokens 64] [--output F]

The one idea: cuDNN's scaled-dot-product attention builds an execution plan for every new input shape, and decoding
changes the key length at every token, so on a GPU where PyTorch prefers that backend (an H100 with torch 2.11, for
half precision) every decoded token may pay the plan's host cost. This script measures it on the reference model:
prefill a held-out context, then decode `--new_tokens` tokens one at a time with a `DynamicCache` (no early stop),
for each setting, and prints milliseconds per prefill and per decoded token with the ratio between the settings
(same run, same rows). On CPU both settings run the same kernels.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch

from harness.reference_model import REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH
from reference import write_report
from reference.evaluate import optional_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_decoding(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill and of `new_tokens` greedy decoding steps after it (one token per forward)."""
    from transformers import DynamicCache

    from kvpress.transformers_adapter import cache_kwargs

    device = str(input_ids.device)
    with_cache = cache_kwargs(model, DynamicCache())
    _sync(device)
    start = time.perf_counter()
    logits = model(input_ids=input_ids, use_cache=True, **with_cache).logits
    _sync(device)
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(input_ids=token, use_cache=True, **with_cache).logits
        token = logits[:, -1:].argmax(-1)
    _sync(device)
    return prefill, time.perf_counter() - start


def main(argv: Optional[list[str]] = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.synthetic.tasks import generate_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=str(REFERENCE_MODEL_DIR))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--context_length", type=int, default=TRAINED_CONTEXT_LENGTH)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=8, help="held-out contexts timed per setting (after one warm-up)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default=None, help="JSON file for the result")
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or args.rows < 1:
        parser.error(f"--new_tokens and --rows must be at least 1, got {args.new_tokens} and {args.rows}")
    device = optional_device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=DTYPES[args.dtype]).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    rows = generate_rows("niah_single_noise", args.rows + 1, args.context_length, tokenizer, seed=7)
    texts = [tokenizer.bos_token + row["context"] + row["question"] for row in rows]
    inputs = [tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device) for text in texts]
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    results = []
    try:
        for label, enabled in (("cuDNN attention on", True), ("cuDNN attention off", False)):
            torch.backends.cuda.enable_cudnn_sdp(enabled)
            time_decoding(model, inputs[0], args.new_tokens)  # warm-up
            prefill = decode = 0.0
            for ids in inputs[1:]:
                p, d = time_decoding(model, ids, args.new_tokens)
                prefill, decode = prefill + p, decode + d
            results.append(
                {
                    "setting": label,
                    "cudnn_sdp": enabled,
                    "prefill_ms": 1000 * prefill / args.rows,
                    "decode_ms_per_token": 1000 * decode / (args.rows * args.new_tokens),
                }
            )
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_before)
    on, off = results
    ratio = on["decode_ms_per_token"] / off["decode_ms_per_token"]
    print(f"{'setting':22s} {'prefill (ms)':>13s} {'decode (ms/token)':>18s}")
    for row in results:
        print(f"{row['setting']:22s} {row['prefill_ms']:13.2f} {row['decode_ms_per_token']:18.3f}")
    print(f"decode time with cuDNN attention / without: {ratio:.2f}")
    report = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "input_tokens": [int(ids.shape[1]) for ids in inputs[1:]],  # context and question
        "new_tokens": args.new_tokens,
        "rows": args.rows,
        "results": results,
        "decode_ratio_cudnn_on_over_off": ratio,
    }
    return write_report(args.output, report)


if __name__ == "__main__":
    main()
