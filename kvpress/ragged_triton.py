# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""A Triton split-K decoding kernel over a ragged layer (`kvpress.ragged_cache`): the `"triton"` ragged backend.

Why: on an H100, FlexAttention's decoding kernel over the packed ragged layout took 2.56 ms of GPU time per step at
32k on the 8B shape (about 3.6x its bandwidth floor), and its compiled call cost the host 240-330 us per layer
against 54-76 us for SDPA (`benchmarks/attention_call_overhead.py`, `benchmarks/results/h100_2026-12-07/`). This
kernel reads each kept entry once and is a plain Triton launch.

How (flash-decoding over CSR segments):
- The query heads of a KV head are folded into the query rows of its segment, `groups x q_len` rows ordered
  (group member, query), as in every ragged backend.
- Pass 1 (`partial_kernel` of `kvpress.ragged_triton_kernels`), grid `(segments, parts)`: program `(s, p)` reads
  rows `p x chunk` to `(p + 1) x chunk` of segment `s` (up to its length, read on the device), `BLOCK_N` rows at a
  time, with an online softmax in float32; it writes its normalised partial output and log-sum-exp. `chunk` (a
  power of two) is chosen from the layer's size so that the programs that have rows to read number about
  `PROGRAMS_PER_SM` per multiprocessor, whatever the segments' lengths: a long segment gets many programs, a short
  one few (head-wise presses keep different counts per head). Programs past their segment's length store nothing.
- Pass 2 (`combine_kernel`), grid `(segments, rows)`: the partials of a row are weighted by their log-sum-exp, and
  the row is written where transformers' attention output `(batch, query, head, dim)` holds it (no copy after).
  A row that sees nothing (padding) reads zeros, as in the reference path.
- Visibility, as in the other backends: an entry is read when in use, its logical position is not after the query's
  (causality among new tokens, from the device copy of the logical length) and its padding bit allows it
  (`row_visible`, copied from the model's attention mask by the plan, `PaddingRows`).
- Nothing reaches the kernels as a host value that a decoding step changes: grid, chunk and buffers depend on the
  layer's buffers only (rebuilt when its `version` changes), so a CUDA graph can capture a step.

On CPU the kernels run only under Triton's interpreter (`TRITON_INTERPRET=1`, set before the first call); the tests
check them there against the reference path.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch

from kvpress.ragged_cache import RaggedLayer

BLOCK_N = 64  # rows of a segment per inner step
PROGRAMS_PER_SM = 4  # programs with rows to read, per multiprocessor
MAX_PARTS = 256  # partials of one segment
PARTS_BLOCK = 16  # partials pass 2 reads at a time
MAX_ROWS = 128  # query rows per segment (groups x q_len) the kernels hold in registers
_kernels: dict[bool, Any] = {}


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _build_kernels() -> Any:
    """The two kernels of `kvpress.ragged_triton_kernels`, jitted now so that `TRITON_INTERPRET` is honoured."""
    import triton

    from kvpress import ragged_triton_kernels

    return triton.jit(ragged_triton_kernels.partial_kernel), triton.jit(ragged_triton_kernels.combine_kernel)


def _kernel_pair() -> Any:
    interpret = _interpreting()
    if interpret not in _kernels:
        _kernels[interpret] = _build_kernels()
    return _kernels[interpret]


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs


def split_size(total_rows: int, max_capacity: int, multiprocessors: int) -> tuple[int, int]:
    """`(chunk, parts)`: rows per program, a power of two from `BLOCK_N` up (a compile-time constant of the kernel,
    so layers of one model share a few variants), such that about `PROGRAMS_PER_SM` programs per multiprocessor have
    rows to read when the layer's rows are in use; and the most programs a segment needs (`max_capacity / chunk`, at
    most `MAX_PARTS`)."""
    target = max(PROGRAMS_PER_SM * multiprocessors, 1)
    chunk = max(BLOCK_N, -(-max(total_rows, 1) // target), -(-max(max_capacity, 1) // MAX_PARTS))
    chunk = 1 << (chunk - 1).bit_length()
    return chunk, max(-(-max_capacity // chunk), 1)


class TritonPlan:
    """The grid, split size and partial buffers of one ragged layer for one query shape; reused by every step and
    rebuilt when the layer's `version` changes (growth, restore). The padding bits (`row_visible`) are the
    `PaddingRows` of `kvpress.ragged_attention`."""

    def __init__(self, layer: RaggedLayer, q_len: int, groups: int, head_dim: int):
        from kvpress.ragged_attention import PaddingRows

        self.version, self.q_len, self.groups = layer.version, q_len, groups
        self.rows = groups * q_len
        if self.rows > MAX_ROWS:
            raise ValueError(
                f"the triton ragged backend holds at most {MAX_ROWS} query rows per KV head (groups x queries), got "
                f"{groups} x {q_len}; use the flex or reference backend for longer forwards"
            )
        self.padding = PaddingRows(layer)
        self.chunk, self.parts = split_size(layer.keys.shape[0], layer.max_capacity, _multiprocessors(layer.device))
        segments = layer.num_segments
        self.acc = torch.empty(segments, self.parts, self.rows, head_dim, dtype=torch.float32, device=layer.device)
        self.lse = torch.empty(segments, self.parts, self.rows, dtype=torch.float32, device=layer.device)

    @property
    def padded(self) -> bool:
        return self.padding.padded


def triton_plan(layer: RaggedLayer, q_len: int, groups: int, head_dim: int) -> TritonPlan:
    key = ("triton", q_len, groups)
    plan = layer.plans.get(key)
    if plan is None or plan.version != layer.version:
        plan = TritonPlan(layer, q_len, groups, head_dim)
        layer.plans[key] = plan
    return plan


def triton_ragged_attention(
    layer: RaggedLayer,
    query: torch.Tensor,
    attention_mask=None,
    scaling: Optional[float] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Attention of `query` `(B, H, q, d)` over `layer`'s segments with the Triton kernels; returns `(B, q, H, d)`."""
    if query.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            "the triton ragged backend runs on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1); "
            f"got a query on {query.device}"
        )
    partial_kernel, combine_kernel = _kernel_pair()
    bsz, num_heads, q_len, head_dim = query.shape
    segments, groups = layer.num_segments, num_heads // layer.num_kv_heads
    plan = triton_plan(layer, q_len, groups, head_dim)
    plan.padding.refresh(layer, attention_mask)
    folded = query.reshape(segments, plan.rows, head_dim)
    keys = layer.keys if layer.keys.dtype == query.dtype else layer.keys.to(query.dtype)
    values = layer.values if layer.values.dtype == query.dtype else layer.values.to(query.dtype)
    output = query.new_empty(bsz, q_len, num_heads, head_dim)  # the layout transformers' attention returns
    scale = float(scaling) if scaling is not None else head_dim**-0.5
    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    rows_pad = max(16, 1 << (plan.rows - 1).bit_length())
    if segments:
        partial_kernel[(segments, plan.parts)](
            folded,
            keys,
            values,
            layer.positions,
            plan.padding.row_visible,
            layer.offsets,
            layer.lengths,
            layer.logical_position,
            plan.acc,
            plan.lse,
            scale,
            float(softcap) if softcap else 1.0,
            folded.stride(0),
            folded.stride(1),
            keys.stride(0),
            values.stride(0),
            plan.acc.stride(0),
            plan.acc.stride(1),
            plan.acc.stride(2),
            plan.lse.stride(0),
            plan.lse.stride(1),
            ROWS=plan.rows,
            ROWS_PAD=rows_pad,
            Q_LEN=q_len,
            D=head_dim,
            D_PAD=d_pad,
            BLOCK=BLOCK_N,
            CHUNK=plan.chunk,
            SOFTCAP=bool(softcap),
            IEEE=query.dtype == torch.float32,
        )
        combine_kernel[(segments, plan.rows)](
            plan.acc,
            plan.lse,
            layer.lengths,
            output,
            plan.acc.stride(0),
            plan.acc.stride(1),
            plan.acc.stride(2),
            plan.lse.stride(0),
            plan.lse.stride(1),
            layer.num_kv_heads,
            groups,
            output.stride(0),
            output.stride(1),
            output.stride(2),
            D=head_dim,
            D_PAD=d_pad,
            Q_LEN=q_len,
            PARTS_PAD=max(PARTS_BLOCK, 1 << (plan.parts - 1).bit_length()),
            PARTS_BLOCK=PARTS_BLOCK,
            CHUNK=plan.chunk,
        )
    return output
