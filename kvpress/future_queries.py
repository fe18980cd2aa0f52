# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Where the queries a press anticipates come from: the RoPE rotation averaged over the next positions, the first of
those positions, and how many of the scored hidden states are sink tokens. Shared by the presses that score keys
against an estimate of future queries (ExpectedAttentionPress and its variants, CapPress), at prefill and during
decoding, where the hidden states they receive are only a window of recent tokens."""

from __future__ import annotations

import torch
from torch import nn

from kvpress.transformers_adapter import position_ids_of
from kvpress.utils import rope_cos_sin


def average_rope_matrix(module: nn.Module, start: int, n_positions: int, head_dim: int, device) -> torch.Tensor:
    """The RoPE rotation averaged over positions `start .. start + n_positions - 1`, a float32 `(d, d)` matrix.

    RoPE at one position maps x to `diag(cos) x + P diag(sin) x`, with P the matrix of rotate_half, so the average
    rotation is `diag(mean cos) + P diag(mean sin)`.
    """
    position_ids = torch.arange(start, start + n_positions, device=device).unsqueeze(0)
    dummy = torch.zeros(1, 1, head_dim, device=device, dtype=torch.float32)
    cos, sin = rope_cos_sin(module, dummy, position_ids)
    mean_cos, mean_sin = cos[0].float().mean(dim=0), sin[0].float().mean(dim=0)
    half = head_dim // 2
    rotate = torch.zeros(head_dim, head_dim, device=device)
    rotate[:half, half:] = -torch.eye(half, device=device)
    rotate[half:, :half] = torch.eye(half, device=device)
    return torch.diag(mean_cos) + rotate * mean_sin.unsqueeze(0)


def next_position(kwargs: dict, hidden_states: torch.Tensor) -> int:
    """The position of the first future query: one after the last scored token's true position (its `position_ids`),
    or the number of hidden states when the call carries no positions (a prefill from position 0)."""
    position_ids = position_ids_of(kwargs)
    if position_ids is not None:
        return int(position_ids[..., -1].max()) + 1
    return hidden_states.shape[1]


def sink_rows(hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict, n_sink: int) -> int:
    """How many of the scored hidden states are sink tokens (positions below `n_sink`): read from the `position_ids`
    that cover them; without those, `n_sink` when the hidden states cover the whole cache (a prefill) and 0 otherwise
    (a window of recent tokens during decoding holds no sink)."""
    q_len = hidden_states.shape[1]
    position_ids = position_ids_of(kwargs)
    if position_ids is not None and position_ids.shape[-1] == q_len:
        return int((position_ids < n_sink).sum(dim=-1).max())
    return n_sink if q_len == keys.shape[2] else 0
