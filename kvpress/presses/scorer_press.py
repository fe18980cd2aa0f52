# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ScorerPress: score every cached token and keep the highest-scoring ones in each KV head.

Two ways to size the cache: `compression_ratio` (upstream: prune a fraction of the context once, after prefill) or
`cache_budget` (the reasoning fork: keep at most that many entries per layer and KV head, in prefill and after every
decoding step; `kvpress.decoding_budget`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from kvpress.decoding_budget import POSITIONS, CacheBudget, DecodingState
from kvpress.presses.base_press import BasePress
from kvpress.token_selection import check_scores, gather_tokens, keep_top_scores
from kvpress.utils import validate_compression_ratio

logger = logging.getLogger(__name__)

# Shared by every scorer; importable from here as before.
__all__ = ["ScorerPress", "DecodingState", "POSITIONS", "check_scores", "gather_tokens", "keep_top_scores"]


@dataclass
class ScorerPress(CacheBudget, BasePress):
    """Score every cached token and keep the highest-scoring ones in each KV head, in positional order.

    Size the cache with one of:

    - `compression_ratio` (upstream): after prefill, every KV head keeps `int(T * (1 - compression_ratio))` of the T
      context tokens; decoding steps are left alone.
    - `cache_budget` (keyword-only, the reasoning fork): every layer keeps at most `cache_budget` entries per KV head,
      through prefill and decoding; the press then acts during decoding (`acts_during_decoding`) and the pipeline
      keeps it on while answering. See `kvpress.decoding_budget.CacheBudget`. `cache_budget=0` (default) means no
      budget.
    """

    compression_ratio: float = 0.0
    cache_budget: int = field(default=0, kw_only=True)

    def __post_init__(self):
        validate_compression_ratio(self.compression_ratio)
        self.validate_cache_budget()

    def n_kept(self, k_len: int) -> int:
        """Entries each KV head keeps out of `k_len`: the budget, or `int(k_len * (1 - compression_ratio))`."""
        if self.cache_budget:
            return min(self.cache_budget, k_len)
        return int(k_len * (1 - self.compression_ratio))

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """Importance of each cached token, `(B, H_kv, T)`; higher is kept."""
        raise NotImplementedError

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache_budget:
            n_kept = self.budget_to_keep(module, keys.shape[2])
            if n_kept is None:
                return keys, values
        elif self.compression_ratio == 0:
            return keys, values
        else:
            n_kept = self.n_kept(keys.shape[2])
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        check_scores(self, scores, keys)
        return keep_top_scores(scores, keys, values, n_kept)
