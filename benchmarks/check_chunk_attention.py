# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Attention of one prefill chunk over its cache: `kvpress.chunk_attention` against transformers' masked sdpa.

For a chunk of `--chunk` queries over caches of several lengths (Llama-3.1-8B attention shape: 32 query heads, 8 KV
heads, head_dim 128, bf16), times both paths side by side, measures the memory each allocates on top of its inputs,
and checks both against float32 attention written out (on the shortest cache). Prints a table, writes JSON.

    python benchmarks/check_chunk_attention.py --output chunk_attention.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from kvpress.chunk_attention import chunk_attention


class _Attention(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def lower_right_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """transformers' boolean sdpa mask for an unpadded chunk: `(1, 1, q, k)`, True = visible."""
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]


def written_out(query, key, value, scale):
    groups = query.shape[1] // key.shape[1]
    key, value = key.float().repeat_interleave(groups, 1), value.float().repeat_interleave(groups, 1)
    logits = query.float() @ key.transpose(-1, -2) * scale
    mask = lower_right_mask(query.shape[2], key.shape[2], query.device)
    return (logits.masked_fill(~mask, float("-inf")).softmax(-1) @ value).transpose(1, 2)


def timed(fn, repeats: int) -> tuple[float, int]:
    """Mean ms per call and the peak bytes allocated beyond what was allocated before the call."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats, torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--cache_lengths", default="8192,32768,131072")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="chunk_attention.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("check_chunk_attention.py measures CUDA kernels: run it on a GPU machine")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    heads, kv_heads, dim = 32, 8, 128
    scale = 1 / math.sqrt(dim)
    module = _Attention(heads // kv_heads).eval()
    rows = []
    for index, k_len in enumerate(int(v) for v in args.cache_lengths.split(",")):
        generator = torch.Generator(device="cuda").manual_seed(k_len)
        shape = dict(device="cuda", dtype=torch.bfloat16, generator=generator)
        query = torch.randn(1, heads, args.chunk, dim, **shape)
        key = torch.randn(1, kv_heads, k_len, dim, **shape)
        value = torch.randn(1, kv_heads, k_len, dim, **shape)
        mask = lower_right_mask(args.chunk, k_len, "cuda")

        def ours():
            return chunk_attention(module, query, key, value, None, scaling=scale)[0]

        def stock():
            return sdpa_attention_forward(module, query, key, value, mask, scaling=scale)[0]

        row = {"chunk": args.chunk, "cache_length": k_len}
        if index == 0:
            reference = written_out(query, key, value, scale)
            row["max_abs_error_ours"] = (ours().float() - reference).abs().max().item()
            row["max_abs_error_stock"] = (stock().float() - reference).abs().max().item()
            del reference
        row["ms_ours"], row["extra_bytes_ours"] = timed(ours, args.repeats)
        row["ms_stock"], row["extra_bytes_stock"] = timed(stock, args.repeats)
        row["mask_bytes"] = mask.numel() * mask.element_size()
        row["speedup"] = row["ms_stock"] / row["ms_ours"]
        rows.append(row)
        torch.cuda.empty_cache()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"chunk attention on {env['gpu']}, torch {env['torch']}, chunk {args.chunk}, 32/8 heads, dim 128, bf16")
    print("cache | ours ms | stock ms | stock/ours | ours extra GiB | stock extra GiB (+ mask GiB) | max err ours/stk")
    for row in rows:
        error = (
            f"{row['max_abs_error_ours']:.2e} / {row['max_abs_error_stock']:.2e}"
            if "max_abs_error_ours" in row
            else "-"
        )
        print(
            f"{row['cache_length']} | {row['ms_ours']:.2f} | {row['ms_stock']:.2f} | {row['speedup']:.2f}x | "
            f"{row['extra_bytes_ours'] / 2**30:.2f} | {row['extra_bytes_stock'] / 2**30:.2f} "
            f"(+ {row['mask_bytes'] / 2**30:.2f}) | {error}"
        )
    Path(args.output).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
