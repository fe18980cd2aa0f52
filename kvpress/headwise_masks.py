# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The head-wise masks of an attention module: the one place that sets, merges, remaps and clears them.

Head-wise presses (AdaKV, DMS, KVzip, ...) keep a different number of tokens in each KV head. They record the
cache entries a head dropped on the layer's attention module as `(batch_idx, head_idx, seq_idx)`, three 1-D index
tensors of equal length (positions in the layer's dense cache). The patched attention (`kvpress.attention_patch`)
hides those entries, the ragged cache (`kvpress.ragged_cache`) drops them, and the pipeline rolls them back after
each question (`kvpress.press_state`). No other code reads or writes the attribute by name.

A module whose cache layer is ragged has an eviction sink (`attach_mask_sink`, set by `RaggedCache.attach`): every
entry masked while it is attached (decoding-time eviction: DMS, DecodingPress over AdaKV) is also evicted from the
layer's segments at once, freeing its row in place. The masks are still recorded, as presses read them back (DMS
counts them, DecodingPress measures a layer's length and merges with them), so both paths see the same state.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import nn

MASK_ATTRIBUTE = "masked_key_indices"

_SINK_ATTRIBUTE = "_kvpress_mask_sink"

MaskIndices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class MaskSink(Protocol):
    """Storage that drops masked entries for real (a ragged cache layer)."""

    def evict(self, batch_idx: torch.Tensor, head_idx: torch.Tensor, positions: torch.Tensor) -> int: ...

    def refuses_remap(self) -> str: ...


def attach_mask_sink(module: nn.Module, sink: MaskSink) -> None:
    """Evict every entry masked on `module` from now on from `sink` too (entries it does not hold are ignored)."""
    module.__dict__[_SINK_ATTRIBUTE] = sink


def detach_mask_sink(module: nn.Module) -> None:
    module.__dict__.pop(_SINK_ATTRIBUTE, None)


def mask_sink(module: nn.Module) -> Optional[MaskSink]:
    """The eviction sink attached to `module`, or None (masks then only hide entries at attention time)."""
    return module.__dict__.get(_SINK_ATTRIBUTE)


def _store(module: nn.Module, indices: Optional[MaskIndices], newly_masked: Optional[MaskIndices]) -> None:
    """Record `indices` as the masks of `module` and evict `newly_masked` from its sink, if it has one."""
    setattr(module, MASK_ATTRIBUTE, indices)
    sink = mask_sink(module)
    if sink is not None and newly_masked is not None and newly_masked[0].numel() > 0:
        sink.evict(*newly_masked)


def _check_indices(indices: object) -> None:
    if not (isinstance(indices, tuple) and len(indices) == 3 and all(isinstance(i, torch.Tensor) for i in indices)):
        raise TypeError(
            "head-wise masks must be None or a tuple (batch_idx, head_idx, seq_idx) of three index tensors, "
            f"got {type(indices).__name__}."
        )
    if any(i.dim() != 1 for i in indices) or len({i.numel() for i in indices}) != 1:
        shapes = [tuple(i.shape) for i in indices]
        raise ValueError(f"head-wise masks need three 1-D index tensors of one length, got shapes {shapes}.")


def get_masks(module: nn.Module) -> Optional[MaskIndices]:
    """The masks of `module` (None when it masks nothing)."""
    return getattr(module, MASK_ATTRIBUTE, None)


def has_masks(module: nn.Module) -> bool:
    return get_masks(module) is not None


def set_masks(module: nn.Module, indices: Optional[MaskIndices]) -> None:
    """Replace the masks of `module` by `indices` (None clears them)."""
    if indices is not None:
        _check_indices(indices)
    _store(module, indices, indices)


def clear_masks(module: nn.Module) -> None:
    """Forget the masks of `module` (a new context is being prefilled). Entries a sink evicted stay evicted."""
    _store(module, None, None)


def set_masks_from_bool(module: nn.Module, pruned: torch.Tensor, empty_as_none: bool = True) -> None:
    """Mask the True entries of `pruned` `(B, H_kv, T)`; with `empty_as_none`, an all-False tensor clears the masks."""
    if pruned.dim() != 3 or pruned.dtype != torch.bool:
        raise ValueError(
            f"pruned must be a boolean (batch, kv_heads, seq_len) tensor, got {pruned.dtype} {pruned.shape}"
        )
    if empty_as_none and not bool(pruned.any()):
        clear_masks(module)
        return
    set_masks(module, pruned.nonzero(as_tuple=True))  # type: ignore[arg-type]


def masks_as_bool(module: nn.Module, shape: tuple[int, int, int], device=None) -> torch.Tensor:
    """The masks of `module` as a boolean tensor of `shape` `(B, H_kv, T)`: True where an entry is masked (entries at
    or beyond `T` are left out)."""
    masked = torch.zeros(shape, dtype=torch.bool, device=device)
    inside = masks_inside(module, shape[-1])
    if inside is not None:
        masked[tuple(i.to(masked.device) for i in inside)] = True
    return masked


def add_masks(module: nn.Module, batch_idx: torch.Tensor, head_idx: torch.Tensor, seq_idx: torch.Tensor) -> None:
    """Append entries to the masks of `module` (they may repeat entries already masked)."""
    new = (batch_idx, head_idx, seq_idx)
    _check_indices(new)
    masked = get_masks(module)
    if masked is None:
        _store(module, new, new)
        return
    device = masked[0].device
    merged = tuple(torch.cat([old, added.to(device)]) for old, added in zip(masked, new))
    _store(module, merged, new)  # type: ignore[arg-type]


def merge_masks(module: nn.Module, previous: Optional[MaskIndices]) -> None:
    """Keep masking what `previous` masked in addition to the masks just set, each entry once (the patched attention
    rewrites a fresh fake key for every listed entry at each step, so an entry dropped from the list would come
    back)."""
    current = get_masks(module)
    if previous is None or current is previous:
        return
    _check_indices(previous)
    if current is None:
        _store(module, previous, previous)
        return
    device = current[0].device
    parts = [torch.stack([idx.to(device) for idx in masks]) for masks in (previous, current)]
    union = torch.unique(torch.cat(parts, dim=1), dim=1)
    # both parts were evicted when they were set: nothing new to evict
    _store(module, (union[0], union[1], union[2]), None)


def masks_inside(module: nn.Module, k_len: int) -> Optional[MaskIndices]:
    """The masks of `module` that point inside a cache of `k_len` tokens."""
    masked = get_masks(module)
    if masked is None:
        return None
    batch_idx, head_idx, seq_idx = masked
    inside = seq_idx < k_len
    return batch_idx[inside], head_idx[inside], seq_idx[inside]


def remap_masks(module: nn.Module, kept: torch.Tensor, k_len: int) -> None:
    """After keeping the tokens `kept` `(B, H_kv, n)` (sorted) of a cache of `k_len`, move the masks of `module` to
    the new positions of the entries they still point at, and drop those that were removed."""
    masked = masks_inside(module, k_len)
    if masked is None:
        return
    sink = mask_sink(module)
    if sink is not None:
        raise ValueError(f"cannot move the masks of layer {getattr(module, 'layer_idx', '?')}: {sink.refuses_remap()}")
    bsz, num_kv_heads, n_kept = kept.shape
    new_position = torch.full((bsz, num_kv_heads, k_len), -1, dtype=torch.long, device=kept.device)
    new_position.scatter_(2, kept, torch.arange(n_kept, device=kept.device).expand_as(kept))
    batch_idx, head_idx, seq_idx = (idx.to(kept.device) for idx in masked)
    mapped = new_position[batch_idx, head_idx, seq_idx]
    still_there = mapped >= 0
    if not still_there.any():
        clear_masks(module)
        return
    remapped = (batch_idx[still_there], head_idx[still_there], mapped[still_there])
    _store(module, remapped, None)  # the same entries, renumbered: nothing new is masked


def masked_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of `model` that currently hold masks."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and get_masks(m) is not None]
