# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ObservedAttentionPress: keep the tokens that received the most attention during prefill, as in H2O
(https://arxiv.org/abs/2306.14048)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.snapkv_press import group_mean
from kvpress.utils import require_eager_attention

logger = logging.getLogger(__name__)


@dataclass
class ObservedAttentionPress(ScorerPress):
    """Score = mean attention each key received from the context queries that can see it (causally), averaged
    over each GQA group. Needs the attention weights, so the model must run eager attention.
    """

    compression_ratio: float = 0.0

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        require_eager_attention(model, type(self).__name__)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        if attentions is None:
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
            raise ValueError(
                f"{type(self).__name__} needs the attention weights, which only eager attention returns; load the "
                f"model with attn_implementation='eager' (got {implementation!r})."
            )
        q_len, k_len = attentions.shape[-2:]
        # Query i (absolute position k_len - q_len + i) sees key j when j <= its position; in prefill that is
        # k_len - j queries.
        positions = torch.arange(k_len, device=attentions.device)
        n_queries = (k_len - positions).clamp(max=q_len).to(attentions.dtype)
        scores = attentions.sum(dim=-2) / n_queries
        return group_mean(scores, keys.shape[1])
