# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ExpectedAttentionPress: keep the tokens that future queries are expected to attend to
(https://arxiv.org/abs/2510.00636)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional

import torch
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from kvpress.attention_weights import group_mean
from kvpress.future_queries import average_rope_matrix, next_position, sink_rows
from kvpress.presses.base_press import FieldCheck, integer_check
from kvpress.presses.scorer_press import ScorerPress
from kvpress.token_selection import pad_with_top_score
from kvpress.utils import attention_scaling, get_prerope_query_states

logger = logging.getLogger(__name__)


@dataclass
class ExpectedAttentionPress(ScorerPress):
    """Model the next `n_future_positions` queries as a Gaussian (mean and covariance of the context's pre-RoPE
    queries, rotated by the RoPE averaged over those future positions) and score each key by its expected
    attention weight, optionally multiplied by the norm of its value. The first `n_sink` tokens are always kept.

    With `use_covariance`, the expected logit adds `k^T cov k * scaling^2 / 2` to `mu . k * scaling`, where
    `scaling` is the attention module's softmax scale. `epsilon` is added to the scores before the value-norm
    weighting.
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    field_checks: ClassVar[Mapping[str, FieldCheck]] = {"n_sink": integer_check(0, "first tokens always kept")}

    # Why DMSPress(decoding=True) cannot score a new token on its own with this press (see BasePress).
    cannot_score_new_tokens_alone: ClassVar[Optional[str]] = (
        "it estimates query statistics from more than n_sink scored tokens, and its score needs more cached tokens "
        "than n_sink (upstream fails with an AssertionError there)"
    )

    def get_query_statistics(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        start_position: int | None = None,
        n_sink_queries: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean `(B, H, d)` and biased covariance `(B, H, d, d)` (None without `use_covariance`) of the pre-RoPE
        queries after the sinks, rotated by the RoPE averaged over the future positions (from `start_position`,
        default the number of tokens). `n_sink_queries` (default `n_sink`) is how many of the first hidden states
        are sink tokens: 0 for a window of recent tokens during decoding, which holds no sink."""
        q_len = hidden_states.shape[1]
        n_drop = self.n_sink if n_sink_queries is None else n_sink_queries
        if q_len <= n_drop:
            raise ValueError(
                f"{type(self).__name__} estimates query statistics from the tokens after the {self.n_sink} sink "
                f"tokens, but got only {q_len} tokens. Use a longer context or a smaller n_sink."
            )
        queries = get_prerope_query_states(module, hidden_states[:, n_drop:])
        mu = queries.mean(dim=2)
        cov = None
        if self.use_covariance:
            centered = queries - mu.unsqueeze(2)
            cov = centered.transpose(2, 3) @ centered / queries.shape[2]
        return self.apply_avg_rope(module, mu, cov, q_len if start_position is None else start_position)

    def apply_avg_rope(
        self, module: nn.Module, mu: torch.Tensor, cov: torch.Tensor | None, q_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotate `mu` (and `cov`) by the RoPE matrix averaged over positions q_len .. q_len + n_future - 1."""
        avg_rope = average_rope_matrix(module, q_len, self.n_future_positions, mu.shape[-1], mu.device).to(mu.dtype)
        mu = mu @ avg_rope.T
        if cov is not None:
            cov = avg_rope @ cov @ avg_rope.T
        return mu, cov

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        num_kv_heads, k_len = keys.shape[1], keys.shape[2]
        if k_len <= self.n_sink:
            raise ValueError(
                f"{type(self).__name__} always keeps the {self.n_sink} sink tokens and scores the others, but the "
                f"cache holds only {k_len} tokens. Use a longer context or a smaller n_sink."
            )
        # future queries follow the last token's true position (during decoding, hidden_states is only a window)
        start = next_position(kwargs, hidden_states)
        # a window of recent tokens holds no sink: none of its states is dropped (upstream drops n_sink of them)
        n_sink_queries = sink_rows(hidden_states, keys, kwargs, self.n_sink)
        mu, cov = self.get_query_statistics(module, hidden_states, start, n_sink_queries=n_sink_queries)
        groups = mu.shape[1] // num_kv_heads
        scored_keys = repeat_kv(keys[:, :, self.n_sink :], groups)
        scaling = attention_scaling(module)
        logits = torch.einsum("bhtd,bhd->bht", scored_keys, mu) * scaling
        if cov is not None:
            logits = logits + torch.einsum("bhtd,bhde,bhte->bht", scored_keys, cov, scored_keys) * (scaling**2 / 2)
        scores = group_mean(logits.softmax(dim=-1), num_kv_heads)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values[:, :, self.n_sink :].norm(dim=-1)
        return pad_with_top_score(scores, self.n_sink, left=True)
