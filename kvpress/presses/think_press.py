# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ThinKPress: prune the least useful key channels, as seen by the last queries
(ThinK, https://arxiv.org/abs/2407.21018).

The one idea: the attention logit `q . k` is a sum over channels; channels where both the recent queries and the
cached keys are small contribute little, so they can be dropped from the keys of the whole context.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import nn

from kvpress.presses.base_press import BasePress, FieldCheck, ratio_check
from kvpress.transformers_adapter import position_embeddings_of
from kvpress.utils import apply_rope, get_prerope_query_states
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)


@dataclass
class ThinKPress(BasePress):
    """Zero the `int(head_dim * key_channel_compression_ratio)` least important key channels of each KV head.

    A channel's importance is `mean(q_c^2) * mean(k_c^2)`: the squared queries of the last `window_size` tokens
    (post-RoPE, averaged over the window and over the query heads of each GQA group) times the squared cached keys
    (averaged over the sequence). The pruned channels are set to 0 in every cached key except the last `window_size`
    ones, which stay full, as in the paper (so a context of at most `window_size` tokens is left as it is); the
    tensor keeps its shape, so this press saves no memory by itself.
    `compression_ratio` is `key_channel_compression_ratio / 2` (keys are half of the cache) and cannot be set.
    """

    key_channel_compression_ratio: float = 0.0
    window_size: int = 32

    field_checks: ClassVar[Mapping[str, FieldCheck]] = {"key_channel_compression_ratio": ratio_check()}

    def __post_init__(self) -> None:
        validate_int(self, "window_size", self.window_size, 1, "the number of last queries that score the channels")

    @property
    def compression_ratio(self) -> float:
        return self.key_channel_compression_ratio / 2

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        raise AttributeError(
            "compression ratio cannot be set for ThinKPress: it is key_channel_compression_ratio / 2; set "
            "key_channel_compression_ratio instead."
        )

    def compute_window_queries(
        self, module: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """The post-RoPE queries of the last `window_size` tokens (all of them when there are fewer),
        `(B, H, min(window_size, T), d)`."""
        window = self.window_size
        cos, sin = position_embeddings
        queries = get_prerope_query_states(module, hidden_states[:, -window:])
        return apply_rope(queries, cos[:, -window:], sin[:, -window:])

    def channel_scores(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict):
        """Importance of each key channel, `(B, H_kv, d)`."""
        bsz, num_kv_heads, _, head_dim = keys.shape
        queries = self.compute_window_queries(module, hidden_states, position_embeddings_of(kwargs))
        query_norm = queries.pow(2).mean(dim=2)  # (B, H, d)
        query_norm = query_norm.view(bsz, num_kv_heads, -1, head_dim).mean(dim=2)
        key_norm = keys.pow(2).mean(dim=2)  # (B, H_kv, d)
        return query_norm * key_norm

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key_channel_compression_ratio == 0:
            return keys, values
        if keys.shape[2] <= self.window_size:
            # every cached key is in the window, which keeps all its channels (upstream runs here too, scoring with
            # the queries it has, and zeroes the channels of every key)
            return keys, values
        head_dim = keys.shape[-1]
        n_pruned = int(head_dim * self.key_channel_compression_ratio)
        if n_pruned == 0:
            return keys, values
        scores = self.channel_scores(module, hidden_states, keys, kwargs)
        pruned = scores.topk(n_pruned, dim=-1, largest=False).indices  # (B, H_kv, n_pruned)
        channel_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, pruned, True)
        # the last window_size cached keys keep all their channels
        n_pruned_tokens = max(keys.shape[2] - self.window_size, 0)
        token_mask = torch.zeros(keys.shape[2], dtype=torch.bool, device=keys.device)
        token_mask[:n_pruned_tokens] = True
        zeroed = channel_mask[:, :, None, :] & token_mask[None, None, :, None]
        return keys.masked_fill(zeroed, 0), values
