# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Attention over a ragged layer (`kvpress.ragged_cache`): each KV head's query group attends to its own segment.

The query heads that share a KV head are folded into the query rows of that head's segment (rows ordered
(group member, query)), so no key is repeated and no segment is padded in the cache. An entry of a segment is
visible to a query when it is in use, its logical position is not after the query's (causality among the new
tokens) and the model's attention mask (padding), read at the entry's logical position, allows it.

Backends (`set_ragged_backend`, or `KVPRESS_RAGGED_BACKEND`):
- `"reference"`: the segments gathered into a padded `(segments, longest, d)` tensor and a masked softmax in
  float32; exact, any device. The default on CPU.
- `"flex"`: FlexAttention over the flat buffer with a block mask built once from the segment offsets (`FlexPlan`;
  appends and evictions change the tensors its mask_mod reads, in place, not the mask); compiled on CUDA, where it
  is the default when Triton does not import. On CPU it runs unfused (tests use it to check the CUDA path's masks).
  Two layouts:
  - packed (a decoding step: fewer than 128 query rows in all): one query "head" holding every segment's query
    rows, one key "head" (the flat buffer), every block visited once. FlexAttention then runs its decoding kernel,
    which splits the keys across the GPU's multiprocessors (measured on an H100, 8B shape, 32k, AdaKV 0.5: 2.7 ms
    per step for the 32 layers, against 29 ms in the per-segment layout);
  - per segment (longer forwards): one query "head" per segment, each visiting the blocks of its own segment. This
    is FlexAttention's main kernel, one thread block per (segment, 128 query rows) walking its segment's keys in
    order: too few thread blocks for a decoding step (measured on an H100, 8B shape, 32k, AdaKV 0.5: 29 ms of
    the step's 41 ms of kernels, where the in-place loop's whole step takes 10 ms).
- `"triton"`: this project's split-K decoding kernel (`kvpress.ragged_triton`), the default on CUDA when Triton
  imports: each program reads one chunk of one segment for all of its folded query rows, a second pass merges the
  partials. Measured on an H100 (8B shape, 32k, batch 1, the CUDA-graph loop): 9.6 ms per token at 0.5 against
  10.8 ms for Knorm in place (0.89x), where flex takes 11.3 ms (1.04x); one layer's call 38 us of kernel at 32k
  against flex's 88 us. At most 128 query rows per KV head; longer forwards use the reference path on CUDA.

`ragged_attention` has the signature of transformers' attention functions and is registered with
`AttentionInterface` as `"kvpress_ragged"`; the patched attention functions (`kvpress.attention_patch`) call it for
every module attached to a ragged layer, whatever backend the model was loaded with.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch

from kvpress.ragged_cache import RaggedLayer, ragged_layer_of
from kvpress.ragged_triton import triton_importable, triton_ragged_attention  # import Triton only when they run

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "flex", "triton")
RAGGED_ATTENTION = "kvpress_ragged"  # the name `register_ragged_attention` gives `ragged_attention`
_FLEX_BLOCK = 128
# FlexAttention's decoding kernel serves fewer than 128 query rows per head (torch's `_use_flex_decoding`)
_PACKED_MAX_ROWS = 128
_state: dict[str, Any] = {
    "backend": os.environ.get("KVPRESS_RAGGED_BACKEND", "auto"),
    "compiled": None,
    "failed": set(),
}
FAST_BACKENDS = ("flex", "triton")  # the decoding-step kernels (CUDA; a CUDA graph can capture either)


def set_ragged_backend(name: str) -> None:
    """Choose the ragged attention backend: "auto" (triton on CUDA when Triton imports, else flex; reference off
    CUDA), "reference", "flex" or "triton" (`kvpress.ragged_triton`: CUDA, or CPU under Triton's interpreter)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown ragged attention backend {name!r}; allowed: {BACKENDS}")
    _state["backend"] = name


def ragged_backend(device: torch.device) -> str:
    name = _state["backend"]
    if name not in BACKENDS:
        raise ValueError(f"KVPRESS_RAGGED_BACKEND={name!r} is not a ragged attention backend; allowed: {BACKENDS}")
    if name == "auto":
        if device.type != "cuda":
            return "reference"
        # measured on an H100 (8B shape, 32k, batch 1, graph loop): triton 0.89x the in-place Knorm step, flex 1.04x
        return "triton" if triton_importable() else "flex"
    return name


def effective_backend(device: torch.device) -> str:
    """The backend decoding steps use on `device` ("reference (<name> failed)" after a failure of flex or triton)."""
    name = ragged_backend(device)
    return f"reference ({name} failed)" if name in _state["failed"] else name


def allowed_columns(layer: RaggedLayer, attention_mask: torch.Tensor, q_len: Optional[int] = None) -> torch.Tensor:
    """The model's mask `(B or 1, 1, q, W)` over the layer's logical positions, checked: `(B or 1, q, logical)` bool
    (True = visible). `q_len`, when given, is the number of query rows the mask must have."""
    rows = "queries" if q_len is None else q_len
    if (
        attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or (q_len is not None and attention_mask.shape[2] != q_len)
    ):
        raise ValueError(
            f"ragged attention takes a (batch, 1, {rows}, keys) attention mask, got {tuple(attention_mask.shape)}"
        )
    width = attention_mask.shape[-1]
    if width < layer.logical_length:
        raise ValueError(
            f"the attention mask covers {width} positions but the ragged layer holds {layer.logical_length}; build "
            "it from the cache's get_mask_sizes"
        )
    allowed = attention_mask[:, 0, :, width - layer.logical_length :]
    return allowed if allowed.dtype == torch.bool else allowed == 0


def _visible_by_mask(layer: RaggedLayer, attention_mask, q_len: int, positions: torch.Tensor) -> Optional[torch.Tensor]:
    """The model's mask `(B or 1, 1, q, W)` read at the entries' logical `positions` `(S, L)`: `(S, q, L)` bool
    (True = visible), or None when the mask hides nothing beyond causality."""
    if not isinstance(attention_mask, torch.Tensor):
        return None
    allowed = allowed_columns(layer, attention_mask, q_len)
    segment_batch = torch.arange(layer.num_segments, device=allowed.device) // layer.num_kv_heads
    allowed = allowed[segment_batch] if allowed.shape[0] > 1 else allowed.expand(layer.num_segments, -1, -1)
    # rows out of use may hold stale positions (from before a rollback): clamped, they are hidden anyway
    index = positions.clamp(0, allowed.shape[-1] - 1).long()[:, None, :].expand(-1, q_len, -1)
    return torch.gather(allowed, 2, index)


def reference_ragged_attention(
    layer: RaggedLayer,
    query: torch.Tensor,
    attention_mask=None,
    scaling: Optional[float] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Exact attention of `query` `(B, H, q, d)` over `layer`'s segments; returns `(B, q, H, d)`."""
    bsz, num_heads, q_len, head_dim = query.shape
    segments, groups = layer.num_segments, num_heads // layer.num_kv_heads
    scale = scaling if scaling is not None else head_dim**-0.5
    longest = max(int(layer.lengths.max()), 1)
    slot = torch.arange(longest, device=layer.device)
    in_use = slot[None, :] < layer.lengths[:, None]
    rows = (layer.offsets[:-1, None].long() + slot[None, :]).clamp(max=layer.keys.shape[0] - 1)
    keys, values, positions = layer.keys[rows], layer.values[rows], layer.positions[rows]
    query_positions = layer.logical_length - q_len + torch.arange(q_len, device=layer.device)
    visible = in_use[:, None, :] & (positions[:, None, :] <= query_positions[None, :, None])  # (S, q, L)
    by_mask = _visible_by_mask(layer, attention_mask, q_len, positions)
    if by_mask is not None:
        visible = visible & by_mask
    visible = visible.repeat(1, groups, 1)  # rows ordered (group member, query)
    folded = query.reshape(segments, groups * q_len, head_dim)
    logits = torch.matmul(folded.float(), keys.float().transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query that sees nothing (padding) reads zeros
    output = torch.matmul(weights, values.float()).to(query.dtype)
    return output.reshape(bsz, num_heads, q_len, -1).transpose(1, 2).contiguous()


class PaddingRows:
    """The padding bit of every row of a ragged layer (`row_visible`, True = visible), a device tensor the attention
    kernels read and `refresh` changes in place (no new tensor, so a CUDA graph can capture a step). Without a mask
    every row is visible; `padded` says whether the last refresh copied a mask in."""

    def __init__(self, layer: RaggedLayer):
        row_segment, _ = layer.rows_in_use()
        self.row_batch = row_segment // layer.num_kv_heads
        self.row_visible = torch.ones(layer.keys.shape[0], dtype=torch.bool, device=layer.device)
        self.padded = False

    def refresh(self, layer: RaggedLayer, attention_mask) -> None:
        """Copy the visibility of every row's entry under `attention_mask` (`(B or 1, 1, q, W)`, its last query row)
        into `row_visible`, in place; without a mask, every row is visible."""
        if not isinstance(attention_mask, torch.Tensor):
            if self.padded:
                self.row_visible.fill_(True)
                self.padded = False
            return
        allowed = allowed_columns(layer, attention_mask)[:, -1]
        batch = self.row_batch if allowed.shape[0] > 1 else torch.zeros_like(self.row_batch)
        column = layer.positions.long().clamp(0, max(layer.logical_length - 1, 0))
        self.row_visible.copy_(allowed[batch, column])
        self.padded = True


class FlexPlan:
    """The FlexAttention block mask of a ragged layer for one query shape, built once and reused by every step.

    Packed layout (`packed`, fewer than `_PACKED_MAX_ROWS` query rows in all, which a decoding step has): one query
    head whose rows are the segments' query rows in segment order (`rows_per_segment` each, ordered (group member,
    query)), over one key head, the flat buffer; it visits every block. Per-segment layout (otherwise): one query
    head per segment, visiting the blocks of its segment's capacity (`offsets[s]` to `offsets[s + 1]`).

    Either way the blocks change only when the layer grows, so appends and evictions leave the block mask as it is.
    The mask_mod reads the layer's tensors, which appends and evictions change in place: `lengths` (rows in use),
    `positions` (causality among new tokens) and the device copy of the logical length; and the plan's own
    `PaddingRows` (padding, per row), refreshed from the model's attention mask when one is given. A step thus
    builds nothing: no host value, no new tensor shape, no new Python object reaches the kernel (what a CUDA graph
    capture needs). The plan is rebuilt when the layer's `version` changes (growth, restore after a rollback).

    The model's mask is read as causality and a per-column visibility (its last query row, a padding mask), which is
    what the full-attention layers the ragged cache serves receive."""

    def __init__(self, layer: RaggedLayer, q_len: int, groups: int):
        from torch.nn.attention.flex_attention import BlockMask

        self.version, self.q_len, self.groups = layer.version, q_len, groups
        segments, n_rows = layer.num_segments, layer.keys.shape[0]
        self.rows_per_segment = rows_per_segment = groups * q_len
        self.packed = segments * rows_per_segment < _PACKED_MAX_ROWS
        total_blocks = max(-(-n_rows // _FLEX_BLOCK), 1)
        if self.packed:
            n_q = segments * rows_per_segment
            kv_num_blocks = torch.full((1, 1, 1), total_blocks, dtype=torch.int32, device=layer.device)
            kv_indices = torch.arange(total_blocks, dtype=torch.int32, device=layer.device)[None, None, None, :]
        else:
            n_q = rows_per_segment
            kv_num_blocks, kv_indices = self._segment_blocks(layer, -(-n_q // _FLEX_BLOCK), total_blocks)
        self.padding = PaddingRows(layer)
        starts, lengths, positions, logical = layer.offsets, layer.lengths, layer.positions, layer.logical_position
        row_visible, packed = self.padding.row_visible, self.packed
        # a tensor, not a Python int: compiled kernels of layers of different sizes then share one graph
        last_row = torch.tensor(max(n_rows - 1, 0), device=layer.device)

        def mask_mod(b, h, q_idx, kv_idx):
            segment = q_idx // rows_per_segment if packed else h
            start = starts[segment]
            row = torch.minimum(kv_idx, last_row)  # key blocks may run past the last row: outside every segment
            entry_pos = positions[row]
            query_pos = logical - q_len + q_idx % q_len
            in_use = (kv_idx >= start) & (kv_idx < start + lengths[segment])
            return in_use & (entry_pos <= query_pos) & row_visible[row]

        self.mask_mod = mask_mod
        self.block_mask = BlockMask.from_kv_blocks(
            kv_num_blocks,
            kv_indices,
            BLOCK_SIZE=_FLEX_BLOCK,
            mask_mod=mask_mod,
            seq_lengths=(n_q, n_rows),
            compute_q_blocks=False,  # inference only: no backward pass
        )

    @property
    def padded(self) -> bool:
        return self.padding.padded

    @staticmethod
    def _segment_blocks(layer: RaggedLayer, q_blocks: int, total_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`kv_num_blocks` `(1, S, q_blocks)` and `kv_indices` `(1, S, q_blocks, max)` of the per-segment layout."""
        segments, offsets = layer.num_segments, layer.offsets.long()
        first = offsets[:-1] // _FLEX_BLOCK
        last = (offsets[1:] - 1).clamp(min=0) // _FLEX_BLOCK
        count = torch.where(offsets[1:] > offsets[:-1], last - first + 1, torch.zeros_like(first))
        max_blocks = max(int(count.max()) if segments else 1, 1)
        if layer.device.type == "cpu":
            # inductor's CPU kernel wants block indices spanning the whole key length (only `count` are visited)
            max_blocks = total_blocks
        indices = (first[:, None] + torch.arange(max_blocks, device=layer.device)).clamp(max=total_blocks - 1)
        kv_num_blocks = count.to(torch.int32)[None, :, None].expand(1, segments, q_blocks).contiguous()
        kv_indices = indices.to(torch.int32)[None, :, None, :].expand(1, segments, q_blocks, max_blocks).contiguous()
        return kv_num_blocks, kv_indices


def flex_plan(layer: RaggedLayer, q_len: int, groups: int) -> FlexPlan:
    """The layer's FlexPlan for `q_len` queries per head and `groups` query heads per KV head (built on first use
    and after the layer's buffers were replaced)."""
    plan = layer.plans.get((q_len, groups))
    if plan is None or plan.version != layer.version:
        plan = FlexPlan(layer, q_len, groups)
        layer.plans[(q_len, groups)] = plan
    return plan


def step_plan(layer: RaggedLayer, q_len: int, groups: int, attention_mask=None) -> FlexPlan:
    """The layer's plan for this step (reused from step to step), with the padding of `attention_mask` copied in."""
    plan = flex_plan(layer, q_len, groups)
    plan.padding.refresh(layer, attention_mask)
    return plan


def segment_block_mask(layer: RaggedLayer, q_len: int, groups: int, attention_mask=None):
    """The FlexAttention BlockMask of `layer` for this step (`step_plan`'s)."""
    return step_plan(layer, q_len, groups, attention_mask).block_mask


def _flex_function(device: torch.device) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _state["compiled"] is None:
        # automatic dynamic shapes: layers of different sizes share one compiled kernel after the first recompile
        _state["compiled"] = torch.compile(flex_attention)
    return _state["compiled"]


def flex_ragged_attention(
    layer: RaggedLayer,
    query: torch.Tensor,
    attention_mask=None,
    scaling: Optional[float] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """FlexAttention over `layer`'s flat buffer in its plan's layout (packed or per segment); returns `(B, q, H, d)`."""
    bsz, num_heads, q_len, head_dim = query.shape
    segments, groups = layer.num_segments, num_heads // layer.num_kv_heads
    plan = step_plan(layer, q_len, groups, attention_mask)
    # rows ordered (segment, group member, query): the query heads of a KV head are consecutive
    folded = query.reshape(1, 1 if plan.packed else segments, -1, head_dim)
    keys, values = layer.keys[None, None].to(query.dtype), layer.values[None, None].to(query.dtype)
    score_mod = None
    if softcap is not None:
        cap = float(softcap)

        def capped(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / cap) * cap

        score_mod = capped

    flex = _flex_function(query.device)
    output = flex(
        folded, keys, values, score_mod=score_mod, block_mask=plan.block_mask, scale=scaling, enable_gqa=not plan.packed
    )
    return output.reshape(bsz, num_heads, q_len, -1).transpose(1, 2).contiguous()


def run_ragged_attention(layer: RaggedLayer, query: torch.Tensor, attention_mask, scaling, softcap) -> torch.Tensor:
    """Attention over `layer` with the chosen backend. On CUDA the compiled FlexAttention or the Triton kernel serves
    decoding steps (one query row per head: one shape per layer size); longer forwards (a question) and any failure
    of the kernel on CUDA (said once in the log) use the reference path. Off CUDA a failure raises."""
    layer.last_query = query  # what the layer's dense view builds its fake keys from (decoding-time presses)
    backend = ragged_backend(query.device)
    on_cuda = query.device.type == "cuda"
    if backend in FAST_BACKENDS and (not on_cuda or query.shape[2] == 1) and backend not in _state["failed"]:
        try:
            if backend == "triton":
                return triton_ragged_attention(layer, query, attention_mask, scaling, softcap)
            return flex_ragged_attention(layer, query, attention_mask, scaling, softcap)
        except Exception as error:  # noqa: BLE001 - any compile/runtime failure falls back, said once
            if not on_cuda:
                raise
            _state["failed"].add(backend)
            logger.warning("The %s backend over the ragged cache failed (%s); using the reference path", backend, error)
    return reference_ragged_attention(layer, query, attention_mask, scaling, softcap)


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """transformers' attention-function signature over a ragged layer; modules without one run SDPA."""
    layer = ragged_layer_of(module, key)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, softcap=softcap, **kwargs
        )
    if dropout:
        raise ValueError("ragged attention serves inference only (dropout must be 0)")
    return run_ragged_attention(layer, query, attention_mask, scaling, softcap), None


def register_ragged_attention() -> None:
    """Register `ragged_attention` as the attention implementation `"kvpress_ragged"`. Safe to call twice."""
    from transformers import AttentionInterface

    AttentionInterface.register(RAGGED_ATTENTION, ragged_attention)
