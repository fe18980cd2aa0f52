# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Keep the best-scored cache entries: check a score tensor, pick the top entries per KV head, gather them (and pad
scores so that entries a scorer does not rank, e.g. its observation window, are always kept)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def keep_top_scores(
    scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_kept: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `n_kept` highest-scoring tokens of each (batch, KV head), in their original positional order."""
    indices = top_indices(scores, n_kept)
    return gather_tokens(keys, indices), gather_tokens(values, indices)


def top_indices(scores: torch.Tensor, n_kept: int) -> torch.Tensor:
    """Indices `(B, H_kv, n_kept)` of the `n_kept` highest scores of each (batch, KV head), sorted by position."""
    return scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values


def gather_tokens(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather `(B, H_kv, n, d)` from `states` `(B, H_kv, T, d)` at per-head token `indices` `(B, H_kv, n)`."""
    expanded = indices.unsqueeze(-1).expand(*indices.shape, states.shape[-1])
    return states.gather(2, expanded).contiguous()


def check_scores(press: object, scores: torch.Tensor, keys: torch.Tensor) -> None:
    """Raise a ValueError unless `scores` holds one score per cached token and KV head of `keys`."""
    expected = keys.shape[:3]
    if scores.shape != expected:
        raise ValueError(
            f"{press.__class__.__name__}.score returned shape {tuple(scores.shape)}; it must return one score per "
            f"cached token and KV head, shape (batch, kv_heads, seq_len) = {tuple(expected)}."
        )


def pad_with_top_score(scores: torch.Tensor, n_pad: int, left: bool = False) -> torch.Tensor:
    """Add `n_pad` positions scored `max + 1` (always kept) to the right of `scores` (or to the left)."""
    top = scores.max().item() + 1 if scores.numel() > 0 else 1.0
    padding = (n_pad, 0) if left else (0, n_pad)
    return F.pad(scores, padding, value=top)
