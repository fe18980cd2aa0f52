# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""LagKVPress: score each partition of the cache relative to the partition that follows it, without attention
(LagKV, https://arxiv.org/abs/2504.04704)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.scorer_press import ScorerPress
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)


@dataclass
class LagKVPress(ScorerPress):
    """Lag-relative scoring.

    After the `n_sink` first tokens, the cache is cut into partitions of `lag_size` tokens. Each partition's keys
    (and values) are min-max normalised per channel with the minimum and maximum of the *next* partition, and a
    token's score is the softmax (over the partition) of the standard deviation of its normalised channels; the key
    and value scores are averaged. Unless `cross_scoring` is set, the scores are then replaced by their rank within
    the partition divided by `lag_size`, so that every partition loses about the same share of tokens.

    The sinks, the last partition and the remainder (which have no reference partition) score 1 and are kept.
    Contexts shorter than `n_sink + 2 * lag_size` tokens get recency scores instead (StreamingLLM-like).
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0
    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name, minimum in (("n_sink", 0), ("lag_size", 1)):
            validate_int(self, name, getattr(self, name), minimum, bound=f"an integer >= {minimum}")

    def lag_relative_scores(self, states: torch.Tensor) -> torch.Tensor:
        """Scores `(B, H_kv, m - 1, lag_size)` of partitions `(B, H_kv, m, lag_size, d)` against their successors."""
        reference = states[:, :, 1:]
        low = reference.amin(dim=-2, keepdim=True)
        high = reference.amax(dim=-2, keepdim=True)
        # A constant channel in the reference partition would divide by zero; its range is clamped instead.
        spread = (high - low).clamp_min(torch.finfo(states.dtype).eps)
        normalised = (states[:, :, :-1] - low) / spread
        return normalised.std(dim=-1).softmax(dim=-1)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        bsz, num_kv_heads, length, head_dim = keys.shape
        sink, lag = self.n_sink, self.lag_size
        if length < sink + 2 * lag:
            scores = torch.ones(bsz, num_kv_heads, length, dtype=keys.dtype, device=keys.device)
            if length > sink:
                recency = torch.arange(length - sink, device=keys.device, dtype=torch.float32) / (length - sink)
                scores[..., sink:] = recency.to(keys.dtype)
            return scores
        n_partitions = (length - sink) // lag
        end = sink + n_partitions * lag
        partition_shape = (bsz, num_kv_heads, n_partitions, lag, head_dim)
        key_partitions = keys[:, :, sink:end].float().reshape(partition_shape)
        value_partitions = values[:, :, sink:end].float().reshape(partition_shape)
        scores = (self.lag_relative_scores(key_partitions) + self.lag_relative_scores(value_partitions)) / 2
        if not self.cross_scoring:
            scores = scores.argsort(dim=-1).argsort(dim=-1) / lag
        scores = scores.to(keys.dtype).flatten(-2)
        ones = torch.ones(bsz, num_kv_heads, 1, dtype=keys.dtype, device=keys.device)
        return torch.cat([ones.expand(-1, -1, sink), scores, ones.expand(-1, -1, length - scores.shape[-1] - sink)], -1)
