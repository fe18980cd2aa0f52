# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ObservedAttentionPress: keep the tokens that received the most attention during prefill, as in H2O
(https://arxiv.org/abs/2306.14048)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kvpress.attention_weights import group_mean, received_attention_sums
from kvpress.presses.scorer_press import ScorerPress

logger = logging.getLogger(__name__)


@dataclass
class ObservedAttentionPress(ScorerPress):
    """Score = mean attention each key received from the observed queries that can see it (causally), averaged
    over each GQA group. Under eager attention the layer's own weights are used; under any other backend (sdpa,
    flash attention) they are recomputed from the queries and cached keys in chunks of queries
    (`kvpress.attention_weights`), so nothing of size T x T is held at once.

    The observed queries are those of `hidden_states`: the context in prefill; during decoding, the recent tokens a
    decoding compression hands over (the last `decoding_window` tokens with a `cache_budget`, the steps since the
    last compression inside DecodingPress). Attention weights that do not cover those queries (a decoding step's
    single row) are not used: the weights are then recomputed, so the score is the same under every backend. For the
    attention accumulated over the whole generation, use H2OPress.
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0

    needs_attention_weights: ClassVar[bool] = True

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        if attentions is not None and attentions.shape[-2] == hidden_states.shape[1]:
            q_len, k_len = attentions.shape[-2:]
            sums = attentions.sum(dim=-2)
        else:
            q_len, k_len = hidden_states.shape[1], keys.shape[2]
            sums, _ = received_attention_sums(module, hidden_states, keys, kwargs)
        # Query i (absolute position k_len - q_len + i) sees key j when j <= its position; in prefill that is
        # k_len - j queries.
        positions = torch.arange(k_len, device=keys.device)
        n_queries = (k_len - positions).clamp(max=q_len).to(sums.dtype)
        scores = sums / n_queries
        return group_mean(scores, keys.shape[1])
