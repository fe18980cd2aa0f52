# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The head-wise masks of an attention module: the one place that sets, merges, remaps and clears them.

Head-wise presses (AdaKV, DMS, KVzip, ...) keep a different number of tokens in each KV head. They record the
cache entries a head dropped on the layer's attention module as `(batch_idx, head_idx, seq_idx)`, three 1-D index
tensors of equal length (positions in the layer's dense cache). The patched attention (`kvpress.attention_patch`)
hides those entries, the ragged cache (`kvpress.ragged_cache`) drops them, and the pipeline rolls them back after
each question (`kvpress.press_state`). No other code reads or writes the attribute by name.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

MASK_ATTRIBUTE = "masked_key_indices"

MaskIndices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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
    setattr(module, MASK_ATTRIBUTE, indices)


def clear_masks(module: nn.Module) -> None:
    """Forget the masks of `module` (a new context is being prefilled)."""
    setattr(module, MASK_ATTRIBUTE, None)


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
    masked = get_masks(module)
    if masked is None:
        set_masks(module, (batch_idx, head_idx, seq_idx))
        return
    device = masked[0].device
    set_masks(module, tuple(torch.cat([old, new.to(device)]) for old, new in zip(masked, (batch_idx, head_idx, seq_idx))))  # type: ignore[arg-type] # noqa: E501


def merge_masks(module: nn.Module, previous: Optional[MaskIndices]) -> None:
    """Keep masking what `previous` masked in addition to the masks just set, each entry once (the patched attention
    rewrites a fresh fake key for every listed entry at each step, so an entry dropped from the list would come
    back)."""
    current = get_masks(module)
    if previous is None or current is previous:
        return
    if current is None:
        set_masks(module, previous)
        return
    device = current[0].device
    parts = [torch.stack([idx.to(device) for idx in masks]) for masks in (previous, current)]
    union = torch.unique(torch.cat(parts, dim=1), dim=1)
    set_masks(module, (union[0], union[1], union[2]))


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
    bsz, num_kv_heads, n_kept = kept.shape
    new_position = torch.full((bsz, num_kv_heads, k_len), -1, dtype=torch.long, device=kept.device)
    new_position.scatter_(2, kept, torch.arange(n_kept, device=kept.device).expand_as(kept))
    batch_idx, head_idx, seq_idx = (idx.to(kept.device) for idx in masked)
    mapped = new_position[batch_idx, head_idx, seq_idx]
    still_there = mapped >= 0
    if not still_there.any():
        clear_masks(module)
        return
    set_masks(module, (batch_idx[still_there], head_idx[still_there], mapped[still_there]))


def masked_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of `model` that currently hold masks."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and get_masks(m) is not None]
