# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""What one decoding step's attention call costs a layer, ragged against dense: `python
benchmarks/attention_call_overhead.py`.

The one idea: in a host-bound decode loop, a layer's attention costs what its call costs the host, not what its
kernel costs the GPU. The ragged cache's decoding step calls the compiled FlexAttention once per layer
(`kvpress.ragged_attention.flex_ragged_attention`), or the Triton kernel with the `triton` backend
(`kvpress.ragged_triton`, timed when Triton can run); the in-place loop calls SDPA on a dense cache. For one layer of
the Llama-3.1-8B shape (32 query heads, 8 KV heads, head dim 128, batch 1) holding `(1 - ratio) x context` entries
per KV head, this script checks that both calls give the same output (the dense cache holds the same entries), then
times each:

- `wall us/call`: `--calls` calls back to back, one synchronisation at the end (the loop's regime: when the host
  is the bottleneck, this is the host's time per call);
- `kernel us/call`: GPU time per call from `torch.profiler` (CUDA only);
- the host events of the compiled call (`TorchDynamo Cache Lookup`, `Torch-Compiled Region`, the compiled graph's
  call), self CPU time per call.

Prints a table and writes `attention_call_overhead.json` in `--output_dir`. `--compile auto` compiles FlexAttention
on CUDA (as the ragged loop does) and runs it eagerly elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

HOST_EVENTS = ("TorchDynamo Cache Lookup", "Torch-Compiled Region", "Call CompiledFxGraph")


def make_layer(context: int, ratio: float, device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int):
    """A ragged layer keeping `round((1 - ratio) * context)` entries per KV head (a different random set per head),
    and the same entries as a dense `(1, kv_heads, kept, head_dim)` cache."""
    from kvpress.ragged_cache import RaggedLayer

    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, kv_heads, context, head_dim, generator=generator).to(device, dtype)
    values = torch.randn(1, kv_heads, context, head_dim, generator=generator).to(device, dtype)
    kept_per_head = max(1, round((1 - ratio) * context))
    order = torch.rand(kv_heads, context, generator=generator).argsort(dim=-1)[:, :kept_per_head].sort(dim=-1).values
    kept = torch.zeros(1, kv_heads, context, dtype=torch.bool)
    kept[0].scatter_(1, order, True)
    index = order.to(device)[None, :, :, None].expand(1, kv_heads, kept_per_head, head_dim)
    dense_keys, dense_values = keys.gather(2, index), values.gather(2, index)
    return RaggedLayer(keys, values, kept.to(device), 16), dense_keys, dense_values, kept_per_head


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_us(call: Callable[[], torch.Tensor], calls: int, device: torch.device) -> float:
    for _ in range(3):
        call()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    _sync(device)
    return 1e6 * (time.perf_counter() - start) / calls


def profiled_us(call: Callable[[], torch.Tensor], calls: int, device: torch.device) -> dict[str, float]:
    """Per call: GPU kernel time (CUDA, `kvpress.decode_profile`) and the self CPU time of the compiled call's host
    events."""
    from torch.profiler import ProfilerActivity, profile

    from kvpress.decode_profile import profile_steps

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
        _sync(device)
    out: dict[str, float] = {}
    for event in prof.key_averages():
        for name in HOST_EVENTS:
            if name in event.key:
                out[name] = out.get(name, 0.0) + event.self_cpu_time_total / calls
    if device.type == "cuda":
        out["kernel"] = 1000 * profile_steps(call, calls, device)["kernel_ms_per_step"]
    return out


def triton_runs(device: torch.device) -> bool:
    """Whether the Triton ragged kernel can run here: Triton installed, and CUDA or its interpreter."""
    from kvpress.ragged_triton import triton_importable

    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return triton_importable() and (device.type == "cuda" or interpreting)


def measure(context: int, ratio: float, device: torch.device, dtype: torch.dtype, compile_flex: bool, calls: int):
    from kvpress import ragged_attention

    layer, dense_keys, dense_values, kept = make_layer(context, ratio, device, dtype, kv_heads=8, head_dim=128)
    query = torch.randn(1, 32, 1, 128, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    if compile_flex:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention)
        previous = ragged_attention._flex_function
        ragged_attention._flex_function = lambda _device: compiled  # type: ignore[assignment]
    try:

        def ragged() -> torch.Tensor:
            return ragged_attention.flex_ragged_attention(layer, query)

        def ragged_triton() -> torch.Tensor:
            from kvpress.ragged_triton import triton_ragged_attention

            return triton_ragged_attention(layer, query)

        def dense() -> torch.Tensor:
            return F.scaled_dot_product_attention(query, dense_keys, dense_values, enable_gqa=True).transpose(1, 2)

        calls_by_name: list[tuple[str, Callable[[], torch.Tensor]]] = [("ragged (FlexAttention)", ragged)]
        if triton_runs(device):
            calls_by_name.append(("ragged (Triton)", ragged_triton))
        calls_by_name.append(("dense (SDPA)", dense))
        dense_out = dense().float()
        tolerance = 2e-2 if dtype != torch.float32 else 1e-4
        for name, call in calls_by_name[:-1]:
            ragged_out = call().float()
            if not torch.allclose(ragged_out, dense_out, atol=tolerance, rtol=tolerance):
                raise AssertionError(
                    f"{name} and dense attention differ by {float((ragged_out - dense_out).abs().max()):.3g} at "
                    f"context {context}, ratio {ratio}: the timings would compare different work"
                )
        rows = []
        for name, call in calls_by_name:
            row = {
                "call": name,
                "context_length": context,
                "ratio": ratio,
                "entries_per_kv_head": kept,
                "compiled": compile_flex if name.startswith("ragged") else False,
                "wall_us_per_call": wall_us(call, calls, device),
                **{f"{key} us/call": value for key, value in profiled_us(call, min(calls, 50), device).items()},
            }
            rows.append(row)
        return rows
    finally:
        if compile_flex:
            ragged_attention._flex_function = previous  # type: ignore[assignment]


def format_table(rows: list[dict]) -> str:
    columns = ["call", "context_length", "ratio", "compiled", "wall_us_per_call"]
    columns += sorted({key for row in rows for key in row if key.endswith("us/call")})
    lines = [" | ".join(columns), "|".join("---" for _ in columns)]
    for row in rows:
        cells = [f"{row[c]:.1f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context_lengths", default="1024,32768", help="comma-separated tokens per KV head")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of each head's entries dropped")
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--output_dir", type=Path, default=Path("benchmark_results/attention_call_overhead"))
    args = parser.parse_args(argv)
    try:
        lengths = [int(part) for part in args.context_lengths.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--context_lengths must be comma-separated integers, got {args.context_lengths!r}")
    if not lengths or min(lengths) < 1:
        parser.error(f"--context_lengths must be positive, got {args.context_lengths!r}")
    if not 0 <= args.ratio < 1:
        parser.error(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.calls < 1:
        parser.error(f"--calls must be positive, got {args.calls}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_flex = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    rows = []
    for length in lengths:
        rows.extend(measure(length, args.ratio, device, dtype, compile_flex, args.calls))
    table = format_table(rows)
    environment = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(dtype),
    }
    print(f"one layer's decoding attention call, Llama-3.1-8B shape, {environment}")
    print(table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "attention_call_overhead.json").write_text(
        json.dumps({"environment": environment, "rows": rows}, indent=1) + "\n"
    )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
