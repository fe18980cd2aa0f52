# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""CapPress: keep the tokens whose values carry the most attention-weighted leverage with respect to an expected
future query direction (CAPKV, https://arxiv.org/abs/2604.25975)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from kvpress.attention_weights import group_mean
from kvpress.future_queries import average_rope_matrix, next_position, sink_rows
from kvpress.presses.scorer_press import ScorerPress
from kvpress.token_selection import pad_with_top_score
from kvpress.utils import get_prerope_query_states
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)


@dataclass
class CapPress(ScorerPress):
    """Attention-weighted value leverage.

    1. Anchor: the mean of the context's pre-RoPE queries (after the sinks), rotated by the RoPE averaged over the
       next `n_future_positions` positions (as in ExpectedAttentionPress).
    2. Attention proxy `w_t = exp(tau * (cos(anchor, k_t) - max_t cos(anchor, k_t)))`.
    3. Ridge leverage of each value under those weights: `l_t = v_t^T A^-1 v_t` with
       `A = I + sum_t (w_t + epsilon) v_t v_t^T`.
    4. Score `w_t * l_t`, averaged over each GQA group. The first `n_sink` tokens are always kept.
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0
    tau: float = 5.0
    n_future_positions: int = 512
    n_sink: int = 4
    epsilon: float = 1e-6

    # Why DMSPress(decoding=True) cannot score a new token on its own with this press (see BasePress).
    cannot_score_new_tokens_alone: ClassVar[Optional[str]] = (
        "it estimates a query anchor from more than n_sink scored tokens"
    )

    def __post_init__(self):
        super().__post_init__()
        for name, minimum in (("n_future_positions", 1), ("n_sink", 0)):
            validate_int(self, name, getattr(self, name), minimum, bound=f"an integer >= {minimum}")

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        k_len, num_kv_heads, head_dim = keys.shape[2], keys.shape[1], keys.shape[3]
        if k_len <= self.n_sink:
            raise ValueError(
                f"Input cache length ({k_len}) must be larger than n_sink={self.n_sink}: CapPress always keeps the "
                "sink tokens and scores the others. Use a longer context or a smaller n_sink."
            )
        # during decoding the hidden states are a window of recent tokens, none of them a sink
        n_sink_rows = sink_rows(hidden_states, keys, kwargs, self.n_sink)
        if hidden_states.shape[1] <= n_sink_rows:
            raise ValueError(
                f"CapPress builds its query anchor from the tokens after the {self.n_sink} sinks, but got only "
                f"{hidden_states.shape[1]} hidden states. Use a longer context or a smaller n_sink."
            )
        groups = module.config.num_attention_heads // num_kv_heads
        scored_keys = repeat_kv(keys[:, :, self.n_sink :], groups).float()
        scored_values = repeat_kv(values[:, :, self.n_sink :], groups).float()

        queries = get_prerope_query_states(module, hidden_states[:, n_sink_rows:]).float()
        # future queries follow the last token's true position
        start = next_position(kwargs, hidden_states)
        rotation = average_rope_matrix(module, start, self.n_future_positions, head_dim, keys.device)
        anchor = (queries @ rotation.T).mean(dim=2)  # (B, H, d)

        similarity = torch.einsum("bhd,bhtd->bht", F.normalize(anchor, dim=-1), F.normalize(scored_keys, dim=-1))
        logits = self.tau * similarity.clamp(-1.0, 1.0)
        weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))  # (B, H, T')

        identity = torch.eye(head_dim, device=keys.device, dtype=torch.float32)
        weighted = scored_values * (weights + self.epsilon).unsqueeze(-1)
        gram = identity + weighted.transpose(-1, -2) @ scored_values  # I + sum_t (w_t + eps) v_t v_t^T
        solved = torch.linalg.solve(gram, scored_values.transpose(-1, -2))  # (B, H, d, T')
        leverage = (scored_values * solved.transpose(-1, -2)).sum(dim=-1)
        scores = group_mean(weights * leverage, num_kv_heads)
        return pad_with_top_score(scores, self.n_sink, left=True)
