# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""TOVAPress: keep the tokens the last token attends to, averaged over heads (https://arxiv.org/abs/2401.06104)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.attention_weights import window_attention
from kvpress.presses.scorer_press import ScorerPress
from kvpress.token_selection import pad_with_top_score
from kvpress.transformers_adapter import position_embeddings_of

logger = logging.getLogger(__name__)


@dataclass
class TOVAPress(ScorerPress):
    """Token Omission Via Attention: score = attention of the last token, averaged over all query heads, so every
    KV head keeps the same tokens. The last token itself is always kept.

    Uses the eager attention weights when the model returns them; otherwise it recomputes the last token's
    attention from its pre-RoPE query.
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        if attentions is not None:
            weights = attentions[..., -1:, :-1]
        else:
            weights = window_attention(module, hidden_states, keys, 1, position_embeddings_of(kwargs))
        # (B, H, 1, T - 1) -> mean over the query and over every head -> (B, 1, T - 1), shared by all KV heads.
        scores = weights.mean(dim=(1, 2)).unsqueeze(1)
        scores = scores.expand(-1, keys.shape[1], -1)
        return pad_with_top_score(scores, 1)
