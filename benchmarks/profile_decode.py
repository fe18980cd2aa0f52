# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Where the time of one decoding step goes: `python benchmarks/profile_decode.py --help` (CUDA only).

A decoding step at batch 1 must read every weight and every kept key and value once; the bandwidth floor is those
bytes over the copy bandwidth. This script prefills a random-weight model shape with a press, moves the cache into
the in-place buffers and then times, each replayed from its own CUDA graph so that launch overhead is out of the
picture:

- `step`: the whole graphed decoding step (`GraphedDecodeStep`), and the same step compiled first
  (`compile_mode="default"`, which fuses the small elementwise kernels);
- `linears`: only the matrix-vector products of the step (every `nn.Linear` of the model applied to one vector, in
  the model's order), i.e. the weight reads at the bandwidth cuBLAS reaches for batch-1 GEMVs;
- `attention`: only `inplace_attention` over every layer's buffer (the KV reads);

and profiles the kernels of one graphed step with `torch.profiler` (count and time per kernel family). The gap
between `step` and `linears + attention` is the cost of the small kernels. Prints a table, writes `profile.json`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from transformers import DynamicCache

from kvpress.benchmark import SHAPES, PressRequest, copy_bandwidth, environment, load_model, parameter_bytes
from kvpress.graphed_decoding import GraphedDecodeStep
from kvpress.inplace_cache import InPlaceCache, inplace_attention
from kvpress.transformers_adapter import cache_kwargs
from kvpress.utils import get_language_model

KERNEL_FAMILIES = (
    ("matmul", r"gemv|gemm|nvjet|cutlass|xmma|splitk|matmul|mm_"),
    ("triton (fused)", r"triton"),
    ("softmax", r"softmax"),
    ("reduction", r"reduce|norm|mean"),
    ("copy / index", r"copy|index|cat|scatter|gather"),
    ("elementwise", r"elementwise|vectorized|unrolled|fill|where|tanh|mul|add"),
)


def family(name: str) -> str:
    lowered = name.lower()
    for label, pattern in KERNEL_FAMILIES:
        if re.search(pattern, lowered):
            return label
    return "other"


def graph_time_ms(fn: Callable[[], object], repeats: int = 50) -> float:
    """Milliseconds per replay of `fn` captured in a CUDA graph (after a warm-up outside capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def step_time_ms(step: GraphedDecodeStep, cache: InPlaceCache, position: int, repeats: int) -> float:
    lengths = cache.lengths()
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    positions = torch.full((1, 1), position, device="cuda")
    step(token, positions)
    torch.cuda.synchronize()
    cache.rollback(lengths)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step(token, positions)
        cache.rollback(lengths)  # the same kept length for every replay
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def kernel_profile(step: GraphedDecodeStep, cache: InPlaceCache, position: int, steps: int = 5) -> dict:
    """Kernel count and time per family for one graphed step (as far as the profiler sees inside graphs)."""
    from torch.profiler import ProfilerActivity, profile

    lengths = cache.lengths()
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    positions = torch.full((1, 1), position, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(token, positions)
            cache.rollback(lengths)
        torch.cuda.synchronize()
    counts: dict[str, int] = defaultdict(int)
    times: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        duration_ms = event.time_range.elapsed_us() / 1000
        counts[family(event.name)] += 1
        times[family(event.name)] += duration_ms
        top[event.name] += duration_ms
    return {
        "kernels_per_step": sum(counts.values()) / steps,
        "families": {
            name: {"kernels_per_step": counts[name] / steps, "ms_per_step": times[name] / steps} for name in counts
        },
        "top_kernels_ms_per_step": dict(sorted(((k, v / steps) for k, v in top.items()), key=lambda kv: -kv[1])[:15]),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3.1-8b", help=f"a shape ({', '.join(SHAPES)}) or a model path")
    parser.add_argument("--press", default="knorm:0.5", help="a benchmark press spec, e.g. knorm:0.5 or none")
    parser.add_argument("--context_length", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--compile", default="default", help="torch.compile mode to profile too, or 'none'")
    parser.add_argument("--output_dir", default="profile_results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("profile_decode.py measures CUDA kernels: run it on a GPU machine")

    device = torch.device("cuda")
    model = load_model(args.model, "cuda", torch.bfloat16, "sdpa", False)
    bandwidth = copy_bandwidth(device)
    weights = parameter_bytes(model)
    vocab = model.config.get_text_config().vocab_size
    input_ids = torch.randint(4, vocab, (1, args.context_length), generator=torch.Generator().manual_seed(0)).cuda()
    request = PressRequest.parse(args.press)
    press = request.build()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if press is not None:
            with press(model):
                model(input_ids=input_ids, logits_to_keep=1, **cache_kwargs(model, cache))
        else:
            model(input_ids=input_ids, logits_to_keep=1, **cache_kwargs(model, cache))
    del input_ids
    inplace = InPlaceCache.from_cache(cache, extra_tokens=64, model=model)
    del cache
    torch.cuda.empty_cache()
    kv_bytes = sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in inplace.layers)  # type: ignore
    kept_bytes = sum(
        layer.valid_keys.numel() * 2 * layer.keys.element_size() for layer in inplace.layers  # type: ignore
    )
    floor_ms = 1000 * (weights + kept_bytes) / bandwidth
    result: dict = {
        "model": args.model,
        "press": args.press,
        "context_length": args.context_length,
        "kept_tokens_layer0": inplace.lengths()[0],
        "weights_bytes": weights,
        "kv_kept_bytes": kept_bytes,
        "kv_buffer_bytes": kv_bytes,
        "floor_ms": floor_ms,
        **environment(device, bandwidth),
    }
    position = args.context_length
    with torch.no_grad():
        step = GraphedDecodeStep(model, inplace)
        result["step_graph_ms"] = step_time_ms(step, inplace, position, args.repeats)
        result["profile_graph"] = kernel_profile(step, inplace, position)
        del step
        if args.compile != "none":
            compiled = GraphedDecodeStep(model, inplace, compile_mode=args.compile)
            result[f"step_compiled_{args.compile}_ms"] = step_time_ms(compiled, inplace, position, args.repeats)
            result["profile_compiled"] = kernel_profile(compiled, inplace, position)
            del compiled

        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        vectors = {
            m.in_features: torch.randn(1, 1, m.in_features, device=device, dtype=torch.bfloat16) for m in linears
        }
        result["linears_ms"] = graph_time_ms(lambda: [m(vectors[m.in_features]) for m in linears], args.repeats)
        result["linear_bytes"] = sum(m.weight.numel() * m.weight.element_size() for m in linears)

        attention_modules = [layer.self_attn for layer in get_language_model(model).layers]
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        query = torch.randn(1, config.num_attention_heads, 1, head_dim, device=device, dtype=torch.bfloat16)
        masks = []
        for layer in inplace.layers:
            slots = torch.arange(layer.capacity, device=device)  # type: ignore[attr-defined]
            masks.append((slots < layer.length)[None, None, None, :])  # type: ignore[attr-defined]

        def attention_only():
            for module, layer, mask in zip(attention_modules, inplace.layers, masks):
                inplace_attention(module, query, layer.keys, layer.values, mask)

        result["attention_ms"] = graph_time_ms(attention_only, args.repeats)

    result["linears_bandwidth_TBps"] = result["linear_bytes"] / result["linears_ms"] / 1e9
    result["attention_bandwidth_TBps"] = kv_bytes / result["attention_ms"] / 1e9
    result["step_graph_x_floor"] = result["step_graph_ms"] / floor_ms
    compiled_key = f"step_compiled_{args.compile}_ms"
    if compiled_key in result:
        result["step_compiled_x_floor"] = result[compiled_key] / floor_ms
    result["small_kernels_ms"] = result["step_graph_ms"] - result["linears_ms"] - result["attention_ms"]

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "profile.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"{args.model}, {args.press}, {args.context_length} tokens on {result.get('gpu')}; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s",
        f"floor (weights {weights / 2**30:.2f} GiB + kept KV {kept_bytes / 2**30:.2f} GiB): {floor_ms:.2f} ms",
        f"graphed step: {result['step_graph_ms']:.2f} ms ({result['step_graph_x_floor']:.2f}x floor), "
        f"{result['profile_graph']['kernels_per_step']:.0f} kernels",
    ]
    if compiled_key in result:
        lines.append(
            f"compiled ({args.compile}) + graphed step: {result[compiled_key]:.2f} ms "
            f"({result['step_compiled_x_floor']:.2f}x floor), "
            f"{result['profile_compiled']['kernels_per_step']:.0f} kernels"
        )
    lines += [
        f"linears only: {result['linears_ms']:.2f} ms ({result['linears_bandwidth_TBps']:.2f} TB/s)",
        f"attention only (whole buffers): {result['attention_ms']:.2f} ms "
        f"({result['attention_bandwidth_TBps']:.2f} TB/s)",
        f"rest (small kernels) in the graphed step: {result['small_kernels_ms']:.2f} ms",
        "kernel families of the graphed step (ms per step, kernels per step):",
    ]
    for name, stats in sorted(result["profile_graph"]["families"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
        lines.append(f"  {name:16s} {stats['ms_per_step']:7.3f} ms  {stats['kernels_per_step']:6.0f}")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    (output_dir / "profile.txt").write_text(text)
    return result


if __name__ == "__main__":
    main()
